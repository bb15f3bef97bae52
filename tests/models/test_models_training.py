import torch
from torch import nn

from fedsim.data import load_digits
from fedsim.models import build_model


def test_mlp_learns_digits_centrally():
    train, test = load_digits(seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", train.input_shape, train.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        for batch in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        predictions = model(torch.from_numpy(test.x)).argmax(dim=1)
    accuracy = (predictions == torch.from_numpy(test.y)).float().mean().item()
    assert accuracy >= 0.9
