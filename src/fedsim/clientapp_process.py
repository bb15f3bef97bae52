"""A long-lived ClientApp process that runs every message a SuperNode receives.

Flower 1.41 runs each message a SuperNode receives in a new process: the SuperNode's
SuperExec (``flower-superexec``, started by the SuperNode in its default ``--isolation
subprocess`` mode, or by the user in ``--isolation process`` mode) polls the SuperNode's
Runtime API for a task and launches ``flwr-clientapp --token ...`` for it, and that
process pulls the task's message, runs the ClientApp, pushes the reply and exits
(``flwr.supernode.runtime.run_clientapp.run_clientapp`` ends in ``flwr_exit``; the only
other executor, Kubernetes, starts a pod per task). Flower offers no way to keep a
ClientApp process alive between messages, so every message pays for a Python interpreter,
Flower, PyTorch and the app's imports: seconds of CPU, where the client's training takes
milliseconds.

:func:`serve` is that missing piece, built from Flower's own task functions: started beside
a SuperNode run with ``--isolation process`` (``fedsim clientapp --runtime-api-address
127.0.0.1:9094``, the SuperNode's ``--port``), it takes the SuperNode's tasks one after
the other, exactly as ``flower-superexec`` does, and runs each as ``flwr-clientapp``
would (pull the message, Context, run and FAB; install the FAB; run the ClientApp; push
the reply and the Context; heartbeats meanwhile), but in this one process. The
ClientApp's Context still travels through the SuperNode with every message, as in
Flower's own processes; what persists between messages is only what the app keeps in
memory (fedsim's per-process worker state: data, model, loss).

It waits for its SuperNode (Flower's HTTP client retries the connection). Like
``flwr-clientapp``, it stops (SIGINT, from Flower's HTTP client) when the SuperNode
refuses a task's token, e.g. after the SuperNode restarted: restart it with its SuperNode
(compose does, ``restart: on-failure``).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_dir
from flwr.common.constant import APP_DIR, ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.utils import get_flwr_home
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

log = logging.getLogger(__name__)

# how often an idle process asks the SuperNode for a task (flower-superexec: every 1 s)
POLL_S = 0.2
# how long a task's message may take to be stored by the SuperNode, polled every INPUT_POLL_S
INPUT_WAIT_S, INPUT_POLL_S = 120.0, 0.02


class ClientAppProcess:
    """Runs the SuperNode's ClientApp tasks at ``runtime_api_address`` in this process.

    Parameters
    ----------
    runtime_api_address : str
        The SuperNode's Runtime API, HOST:PORT (``flower-supernode --port``).
    root_certificates : bytes or None, default None
        PEM CA certificates of a Runtime API served over TLS; None: plain HTTP.
    """

    def __init__(self, runtime_api_address: str, root_certificates: bytes | None = None) -> None:
        self.address, self.root_certificates = runtime_api_address, root_certificates
        self._load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self._apps: dict[str, ClientApp] = {}
        self._acquirer = self._client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))

    def _client(self, *interceptors) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.root_certificates is None,
            root_certificates=self.root_certificates, interceptors=list(interceptors),
            retry_invoker=make_simple_http_retry_invoker())

    def serve(self, max_tasks: int | None = None, poll_s: float = POLL_S) -> int:
        """Take and run tasks until ``max_tasks`` ran (forever when None); return how many ran."""
        done = 0
        while max_tasks is None or done < max_tasks:
            response = self._acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if response.HasField("task") and response.token:
                self.run_task(response.token)
                done += 1
            else:
                time.sleep(poll_s)
        return done

    def app(self, fab_id: str, fab_version: str, fab_hash: str) -> ClientApp:
        """The ClientApp of a FAB, loaded once per process.

        Before a FAB's app is loaded, the modules other FABs imported from their own
        directories are forgotten, so that an app's module is never served from another
        version of the app (the apps already loaded keep the modules they were built from).
        """
        if fab_hash not in self._apps:
            project, apps = get_project_dir(fab_id, fab_version, fab_hash), get_flwr_home() / APP_DIR
            for name, module in list(sys.modules.items()):
                source = getattr(module, "__file__", None)
                if source and Path(source).is_relative_to(apps) and not Path(source).is_relative_to(project):
                    del sys.modules[name]
            self._apps[fab_hash] = self._load(fab_id, fab_version, fab_hash)
        return self._apps[fab_hash]

    def run_task(self, token: str) -> None:
        """Run one task as ``flwr-clientapp --token TOKEN`` would, without exiting."""
        start = time.perf_counter()
        client = self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                              RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(_task_heartbeat(client))
        heartbeat.start()
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = _pull_task_input(client)
            if fab.hash_str not in self._apps:
                install_from_fab(fab.content, skip_prompt=True)
            app = self.app(run.fab_id, run.fab_version, fab.hash_str)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001  (a failing app fails its task, as in flwr-clientapp)
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(exc, LoadClientAppError) else \
                ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(exc)}:<'{exc}'>"
            log.error("ClientApp raised an exception", exc_info=exc)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            if reply is not None and context is not None:
                try:
                    push_message(client, reply, context)
                except (httpx.HTTPError, RuntimeError) as exc:
                    log.error("failed to push the reply message", exc_info=exc)
            # before the task's output, which revokes its token: a heartbeat sent after that is
            # refused (401), and Flower's HTTP client answers a 401 with SIGINT to the process
            if heartbeat.is_running:
                heartbeat.stop()
            push_task_output(client=client, context=context, sub_status=status, details=details)
            client.close()
            log.debug("%s message %s in %.3f s", message.metadata.message_type if message else "a",
                      status, time.perf_counter() - start)


def _pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """The task's message, Context, run and FAB, as Flower's ``run_clientapp.pull_task_input``
    pulls them, except that it waits for the message instead of failing or backing off.

    A SuperNode offers a task as soon as a message arrives, before it has stored the
    message and pulled its content from the SuperLink. ``flwr-clientapp`` starts seconds
    later and finds them there; a process already running asks within milliseconds, and
    Flower's pull would then fail ("No messages received") or retry after 1, 2, 4, ... s.
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    deadline = time.monotonic() + INPUT_WAIT_S
    while not (pulled := client.PullMessages(PullAppMessagesRequest())).messages_list:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the SuperNode stored no message for this task within {INPUT_WAIT_S:.0f} s")
        time.sleep(INPUT_POLL_S)
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=INPUT_POLL_S, backoff_cap=10 * INPUT_POLL_S)
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its own id
    return message, context, run, fab


def _task_heartbeat(client: RuntimeHttpClient):
    """Flower's task heartbeat, except that a task the SuperNode gave up on ends quietly
    (``flwr-clientapp`` raises SIGINT there, which would stop this whole process)."""
    request = SendTaskHeartbeatRequest()

    def send() -> bool:
        try:
            client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                return False
            raise
        return True

    return send


def serve(runtime_api_address: str, root_certificates: Path | None = None, verbose: bool = False) -> None:
    """Serve the SuperNode's ClientApp tasks at ``runtime_api_address`` until stopped;
    Flower's own logs (connection retries, ...) only when ``verbose``."""
    certificates = None if root_certificates is None else Path(root_certificates).read_bytes()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)
    log.info("running the ClientApp tasks of the SuperNode at %s in this process", runtime_api_address)
    ClientAppProcess(runtime_api_address, certificates).serve()
