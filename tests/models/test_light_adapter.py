import json

import pytest
import torch
from tolerances import FP32_SHALLOW, assert_close_to_scale

from speechmapper_tune.checkpoint.projector_io import load_projector, save_projector
from speechmapper_tune.models.light_adapter import LightAdapter, light_adapter
from speechmapper_tune.models.projector import build_projector_from_config, count_parameters, speechmapper_small


def tiny(**kw):
    return light_adapter(16, 24, **{"hidden_dim": 32, "stack_frames": 4, **kw})


def test_output_length_is_ceil_of_frames_over_the_stack():
    model = tiny().eval()
    for n in range(1, 30):
        out, out_len = model(torch.randn(1, n, 16))
        assert out.shape == (1, model.output_length(n), 24) and int(out_len[0]) == model.output_length(n) == -(
            -n // 4
        ), n
        assert model.output_length(torch.tensor([n])).item() == model.output_length(n)
    assert model.output_dim == 24 and model.input_dim == 16


def test_each_vector_is_the_mlp_of_its_stacked_frames():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(1, 10, 16)  # groups: frames 0-3, 4-7, 8-9 + two zero frames
    out, _ = model(x)
    groups = torch.cat([x, torch.zeros(1, 2, 16)], dim=1).reshape(1, 3, 64)
    assert_close_to_scale(out, model.mlp(groups), FP32_SHALLOW)


def test_batched_equals_one_by_one_and_padding_does_not_leak():
    torch.manual_seed(1)
    model = tiny().eval()
    lengths = [13, 4, 1, 9]
    xs = [torch.randn(n, 16) for n in lengths]
    batch = torch.full((len(xs), max(lengths), 16), 1e3)  # loud padding: must not reach any real vector
    for i, x in enumerate(xs):
        batch[i, : len(x)] = x
    out, out_len = model(batch, torch.tensor(lengths))
    for i, x in enumerate(xs):
        single, n = model(x[None])
        assert int(n) == int(out_len[i])
        assert_close_to_scale(out[i, : int(n)], single[0], FP32_SHALLOW)
        assert out[i, int(n) :].abs().sum().item() == 0


def test_save_load_round_trip_and_far_fewer_parameters_than_the_speechmapper_projector(tmp_path):
    torch.manual_seed(2)
    model = tiny().eval()
    save_projector(tmp_path, model, {"stage": 2})
    assert json.loads((tmp_path / "projector_config.json").read_text())["projector"]["kind"] == "light"
    loaded, _ = load_projector(tmp_path)
    assert isinstance(loaded, LightAdapter) and loaded.config == model.config
    x = torch.randn(2, 11, 16)
    assert torch.equal(loaded.eval()(x, torch.tensor([11, 6]))[0], model(x, torch.tensor([11, 6]))[0])
    assert isinstance(build_projector_from_config(model.config.to_dict()), LightAdapter)
    # the embedded default's sizes (Whisper base 512 -> SmolLM2 576)
    light, small = light_adapter(512, 576, hidden_dim=512, stack_frames=4), speechmapper_small()
    assert count_parameters(light) * 2 < count_parameters(small)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="stack_frames"):
        tiny(stack_frames=0)
    with pytest.raises(ValueError, match=r"expected features \[B, T, 16\]"):
        tiny()(torch.randn(1, 5, 8))
