"""A small model zoo: every model is ``head(features(x))`` with a linear head."""

from fedsim.models.causal_lm import CausalLM
from fedsim.models.char_lstm import CharLSTM
from fedsim.models.classifier import EmbeddingClassifier
from fedsim.models.cnn import CNN
from fedsim.models.lenet5 import LeNet5
from fedsim.models.mlp import MLP
from fedsim.models.registry import MODELS, build_model
from fedsim.models.resnet8 import BasicBlock, ResNet8

__all__ = [
    "CNN",
    "CausalLM",
    "CharLSTM",
    "MLP",
    "MODELS",
    "BasicBlock",
    "EmbeddingClassifier",
    "LeNet5",
    "ResNet8",
    "build_model",
]
