"""CM3LeonConfig: validation, presets, (de)serialisation and the parameter counts of the paper-sized presets."""

import io

import pytest
import torch

from cm3leon_lightning.config import PRESETS, CM3LeonConfig
from cm3leon_lightning.model import CM3Leon


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 100, "n_head": 3}, "d_model (100) must be divisible by CM3LeonConfig.n_head (3)"),
        ({"n_layer": 0}, "n_layer must be an integer >= 1, got 0"),
        ({"vocab_size": -5}, "vocab_size must be an integer >= 1, got -5"),
        ({"d_ff": 2.5}, "d_ff must be an integer >= 1, got 2.5"),
        ({"max_seq_len": True}, "max_seq_len must be an integer >= 1, got True"),
        ({"activation": "tanh"}, "activation must be one of ('gelu', 'relu', 'swiglu'), got 'tanh'"),
        ({"tie_embeddings": 1}, "tie_embeddings must be a bool, got 1"),
        ({"init_std": 0.0}, "init_std must be a finite number > 0, got 0.0"),
        ({"init_std": float("inf")}, "init_std must be a finite number > 0, got inf"),
        ({"init_std": True}, "init_std must be a finite number > 0, got True"),
        ({"pos_init_std": -1.0}, "pos_init_std must be a finite number >= 0, got -1.0"),
        ({"pos_init_std": None}, "pos_init_std must be a finite number >= 0, got None"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps must be a finite number > 0, got 0.0"),
        ({"layer_norm_eps": "1e-5"}, "layer_norm_eps must be a finite number > 0, got '1e-5'"),  # YAML 1.1's 1e-5
    ],
)
def test_invalid_fields_raise_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=f"CM3LeonConfig.{message}".replace("(", r"\(").replace(")", r"\)")):
        CM3LeonConfig.from_preset("tiny", **overrides)


def test_unknown_preset_and_unknown_field():
    with pytest.raises(ValueError, match=r"unknown CM3LeonConfig preset '1b'; choose one of \['350m', '760m', '7b'"):
        CM3LeonConfig.from_preset("1b")
    with pytest.raises(ValueError, match=r"unknown CM3LeonConfig field\(s\) \['dropout'\]"):
        CM3LeonConfig.from_preset("tiny", dropout=0.1)


def test_defaults_are_the_350m_preset_and_overrides_apply():
    assert CM3LeonConfig() == CM3LeonConfig.from_preset("350m")
    cfg = CM3LeonConfig.from_preset("tiny", vocab_size=1024, activation="swiglu")
    assert (cfg.vocab_size, cfg.activation, cfg.n_layer, cfg.head_dim) == (1024, "swiglu", 2, 16)
    assert PRESETS["tiny"]["vocab_size"] == 512  # overrides never mutate the registry


def test_round_trip_through_dict_and_weights_only_torch_load():
    cfg = CM3LeonConfig.from_preset("7b")
    data = cfg.to_dict()
    assert all(isinstance(v, (int, float, str, bool)) for v in data.values())
    buffer = io.BytesIO()
    torch.save({"config": data}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["config"]
    assert CM3LeonConfig.from_dict(loaded) == cfg


@pytest.mark.parametrize(
    ("name", "shape", "nominal"),
    [
        ("350m", (24, 1024, 16, 3584, "gelu", True, 4096, 64512), 350e6),
        ("760m", (24, 1536, 16, 5888, "gelu", True, 4096, 64512), 760e6),
        ("7b", (32, 4096, 32, 16384, "gelu", False, 4096, 64512), 7e9),
    ],
)
def test_paper_presets_have_the_decided_shapes_and_nominal_size(name, shape, nominal):
    """Counted metaseq's way: unique trainable parameters (tied embedding once), position embedding included."""
    cfg = CM3LeonConfig.from_preset(name)
    c = cfg
    assert (
        c.n_layer,
        c.d_model,
        c.n_head,
        c.d_ff,
        c.activation,
        c.tie_embeddings,
        c.max_seq_len,
        c.vocab_size,
    ) == shape
    with torch.device("meta"):
        model = CM3Leon(cfg)
    counted = model.num_parameters()
    assert counted == cfg.num_parameters()
    assert abs(counted - nominal) / nominal < 0.01, f"{name}: {counted / 1e6:.1f}M"  # the docstring says 1%


def test_analytic_count_matches_a_real_model_for_every_activation_and_tying():
    for activation in ("gelu", "relu", "swiglu"):
        for tie in (True, False):
            cfg = CM3LeonConfig.from_preset("tiny", activation=activation, tie_embeddings=tie)
            model = CM3Leon(cfg)
            assert model.num_parameters() == cfg.num_parameters()
            unique = {id(p): p.numel() for p in model.parameters()}
            assert sum(unique.values()) == cfg.num_parameters()


@pytest.mark.parametrize("overrides", [{}, {"activation": "swiglu"}, {"tie_embeddings": False}])
def test_forward_flops_equal_torchs_flop_counter(overrides):
    """forward_flops(T) per sequence is what FlopCounterMode counts for a forward (SDPA's math backend, whose
    attention is plain matmuls), and 3x that for forward plus backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = CM3LeonConfig.from_preset("tiny", **overrides)
    model = CM3Leon(config)
    B, T = 3, 40
    x = torch.randint(0, config.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        model(x)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step:
        model(x).float().sum().backward()
    assert forward.get_total_flops() == B * config.forward_flops(T)
    assert step.get_total_flops() == 3 * B * config.forward_flops(T)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        config.forward_flops(0)
