"""The ServerApp: Flower's usual one, with fedsim's Flag Aggregator as the strategy."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from digits_app.task import Net, load_test_data, test
from fedsim.flower import Flag

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds with the Flag Aggregator and save the final model."""
    config = context.run_config
    strategy = Flag(fraction_train=config["fraction-train"], r=config["flag-r"])
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        num_rounds=config["num-server-rounds"],
        train_config=ConfigRecord({"lr": config["lr"], "local-epochs": config["local-epochs"]}),
        evaluate_fn=global_evaluate,
    )
    torch.save(result.arrays.to_torch_state_dict(), "final_model.pt")


def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Accuracy and loss of the global model on the whole test split."""
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = test(model, load_test_data())
    return MetricRecord({"accuracy": accuracy, "loss": loss})
