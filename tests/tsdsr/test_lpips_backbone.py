"""make_lpips: no third-party warnings, AlexNet weights from .pth or .safetensors, and a file that
would unpickle objects refused in one line without running them."""

import warnings

import pytest
import torch

pytest.importorskip("lpips")
torchvision = pytest.importorskip("torchvision")

from examples.tsdsr.training.models import make_lpips  # noqa: E402
from scoredistill.cli import UserError  # noqa: E402
from tests.bad_input_files import RunsCode  # noqa: E402


def test_building_lpips_gives_no_warnings():
    # lpips passes torchvision's deprecated `pretrained=`: two deprecation warnings per build.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_lpips(None)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_alexnet_weights_load_from_either_format(tmp_path, suffix):
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        state = torchvision.models.alexnet().state_dict()
    path = tmp_path / f"alexnet{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    model = make_lpips(str(path))
    for block in (model.net.slice1, model.net.slice5):
        for name, layer in block.named_children():
            for key, value in layer.state_dict().items():
                assert torch.equal(value, state[f"features.{name}.{key}"])


def test_a_pickled_object_is_refused_unrun(tmp_path):
    path, marker = tmp_path / "alexnet.pth", tmp_path / "ran"
    torch.save({"features.0.weight": RunsCode(marker)}, path)
    with pytest.raises(UserError) as info:
        make_lpips(str(path))
    message = str(info.value)
    assert "--lpips-backbone" in message and str(path) in message and "pickled" in message
    assert "weights_only" not in message and "\n" not in message
    assert not marker.exists()
