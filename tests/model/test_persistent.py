"""The persistent decode step's plan (model/persistent.py), without Triton: the phases and tasks of a step, the
task table the kernel reads, and the sizes chosen per device."""

import pytest
import torch

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.model import CM3Leon
from cm3leon_lightning.model.persistent import (
    ATTN,
    DOWN,
    EMBED,
    HEAD,
    MAX_ROWS,
    OUT,
    QKV,
    UP,
    PersistentTiles,
    attention_tile,
    default_attn_splits,
    persistent_unsupported,
    programs_per_sm,
    step_phases,
    task_table,
)


def test_a_350m_step_for_one_image_with_cfg_is_these_tasks():
    """2 rows at 350m (24 layers, 16 heads, d_model 1024, d_ff 3584), the 8192 image-code rows of the head, the
    default tiles (16 columns per task, the down-projection split 4 ways) and 8 runs per (row, head): every count."""
    phases = step_phases(24, 2, 16, 1024, 3584, 8192, PersistentTiles(), attn_splits=8)
    assert len(phases) == 1 + 5 * 24 + 1
    assert [(p.op, p.tasks, p.outputs) for p in phases[:6]] == [
        (EMBED, 2, 2),
        (QKV, 192, 192),  # 3072 columns
        (ATTN, 2 * 16 * 8, 2 * 16),  # finished once per (row, head), by its last run
        (OUT, 64, 64),
        (UP, 224, 224),
        (DOWN, 64 * 4, 64),  # finished once per column block, by its last split
    ]
    assert [p.layer for p in phases[1:-1]] == [layer for layer in range(24) for _ in range(5)]
    assert (phases[-1].op, phases[-1].tasks) == (HEAD, 512)
    assert sum(p.tasks for p in phases) == 2 + 24 * (192 + 256 + 64 + 224 + 256) + 512


def test_the_task_table_orders_phases_and_says_what_each_task_waits_for():
    phases = step_phases(2, 3, 4, 64, 256, 100, PersistentTiles(down_split=2), attn_splits=3)
    table = task_table(phases)
    assert len(table) == sum(p.tasks for p in phases)
    assert [row[3] for row in table] == sorted(row[3] for row in table)  # phases in order, each one's tasks together
    for p, phase in enumerate(phases):
        rows = [row for row in table if row[3] == p]
        assert [row[2] for row in rows] == list(range(phase.tasks))
        assert {(row[0], row[1]) for row in rows} == {(phase.op, phase.layer)}
        assert {row[4] for row in rows} == {phases[p - 1].outputs if p else 0}
    head = [row for row in table if row[0] == HEAD]
    assert len(head) == 7  # 100 rows in 16-column blocks
    assert [p.op for p in phases[:7]] == [EMBED, QKV, ATTN, OUT, UP, DOWN, QKV]


def test_device_sizes():
    # one image with CFG at 350m: 32 (row, head) pairs, 528 programs (132 SMs x 4): 8 runs; 8 candidates: 256 pairs
    assert default_attn_splits(32, 528) == 8 and default_attn_splits(256, 528) == 2
    assert default_attn_splits(1024, 528) == 1 and default_attn_splits(3, 2) == 1
    # 8 KB of keys and values per iteration: bf16 head_dim 64 -> 32 slots, fp32 -> 16, head_dim 128 bf16 -> 16
    assert attention_tile(64, 2, PersistentTiles()) == 32
    assert attention_tile(64, 4, PersistentTiles()) == 16 and attention_tile(128, 2, PersistentTiles()) == 16
    assert attention_tile(16, 4, PersistentTiles()) == 64
    assert attention_tile(64, 2, PersistentTiles(attn_block_s=64)) == 64
    # programs per SM: registers (128 a thread, 4 warps -> 4), shared memory, the cap
    assert programs_per_sm(128, 20 * 1024, 4) == 4
    assert programs_per_sm(64, 20 * 1024, 4) == 8 and programs_per_sm(64, 20 * 1024, 4, most=6) == 6
    assert programs_per_sm(32, 100 * 1024, 4) == 2 and programs_per_sm(255, 200 * 1024, 8) == 1


@pytest.mark.parametrize(
    "field,value", [("block_n", 24), ("block_k", 8), ("attn_block_s", 100), ("down_split", 0), ("per_sm", 0)]
)
def test_bad_tiles_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"PersistentTiles.{field}"):
        PersistentTiles(**{field: value})


def test_what_the_step_cannot_run_is_named():
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", max_seq_len=16)).eval()
    model.setup_kv_cache(batch_size=2, max_seq_len=8)
    assert persistent_unsupported(model, 2) is None and persistent_unsupported(model, MAX_ROWS) is None
    assert "at most 63 rows" in persistent_unsupported(model, 64)
    model.blocks[0].mlp.fc_in.weight.data = model.blocks[0].mlp.fc_in.weight.data.double()
    assert "one dtype" in persistent_unsupported(model, 2)
    model.blocks[0].mlp.fc_in.weight.data = model.blocks[0].mlp.fc_in.weight.data.float()
    cache = model.kv_cache
    cache.k1 = cache.k1.transpose(2, 3).contiguous().transpose(2, 3)  # same shape, slots no longer contiguous
    assert "contiguous cache buffers of one layout" in persistent_unsupported(model, 2)
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", max_seq_len=16)).eval().to(torch.bfloat16)
    model.setup_kv_cache(batch_size=2, max_seq_len=8)
    model.kv_cache.to(torch.float32)
    assert "one dtype" in persistent_unsupported(model, 2)


def test_swiglu_models_and_weights_stored_column_major_are_named_not_misread():
    """A SwiGLU model (whose gate the step has no task for) used to fail with a bare KeyError while being planned; a
    weight stored column-major (``w.t().contiguous().t()``: same shape, strides ``(1, N)``) was read by the kernel
    as rows of K values, silently wrong logits. Both are named, so the fused step runs the kernels one by one."""
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", max_seq_len=16, activation="swiglu")).eval()
    model.setup_kv_cache(batch_size=2, max_seq_len=8)
    assert "supports activations ('gelu', 'relu'), not 'swiglu'" in persistent_unsupported(model, 2)
    model = CM3Leon(CM3LeonConfig.from_preset("tiny", max_seq_len=16)).eval()
    model.setup_kv_cache(batch_size=2, max_seq_len=8)
    weight = model.blocks[1].mlp.fc_out.weight
    weight.data = weight.data.t().contiguous().t()
    assert weight.stride() == (1, weight.shape[0])
    assert "contiguous weights" in persistent_unsupported(model, 2)
