"""``cm3leon predict`` on two CPU processes (DDP, gloo) that a launcher such as torchrun started (``LOCAL_RANK`` set,
so Lightning starts none and stops none): when rank zero fails to write the shared files (the resumed run's merge of
the earlier lines, the settings file, the final merge), every rank raises at once, naming the file."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from support.eval_setup import tiny_module, tiny_tokenizer

TESTS = Path(__file__).resolve().parents[1]
DEADLINE_S = 240  # the whole test; each collective also times out after 60 s (gloo's default: 30 minutes)


def _worker(rank: int, port: int, root: str) -> None:
    """One rank: three predict runs whose rank-zero file step fails; what each rank raised goes to ``rank{r}.json``."""
    sys.path.insert(0, str(TESTS))
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from cm3leon_lightning.generation.generate import GenerationSettings
    from cm3leon_lightning.generation.predict import ImageWriter, PromptDataModule
    from cm3leon_lightning.modules.cm3leon import CM3LeonModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    base = Path(root)
    errors = {}
    for case in ("resume", "start", "end"):
        dm = PromptDataModule(str(base / "prompts.txt"), str(base / "tok"), str(base / "model.ckpt"), 1)
        module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict(), generation=GenerationSettings(num_samples=1))
        writer = ImageWriter(str(base / case), None, resume=case == "resume")
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=60)), logger=False,
            callbacks=[writer], enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        )  # fmt: skip
        try:
            trainer.predict(module, datamodule=dm, ckpt_path=str(base / "model.ckpt"), return_predictions=False)
            errors[case] = None
        except Exception as e:  # noqa: BLE001 - recorded for the test to check
            errors[case] = f"{type(e).__name__}: {e}"
    (base / f"rank{rank}.json").write_text(json.dumps(errors))


def test_a_rank_zero_file_failure_stops_every_rank_naming_the_file(tmp_path: Path) -> None:
    """Rank zero failed (here: ``predictions.jsonl`` or ``predict_settings.json`` is a directory) while the other ranks
    waited at a barrier: under torchrun or SLURM they hung until the process group's timeout, and then failed with a
    gloo error that named no file."""
    tok = tiny_tokenizer()
    tok.save(tmp_path / "tok")
    module = tiny_module(tok)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save({**ckpt, "pytorch-lightning_version": L.__version__}, tmp_path / "model.ckpt")
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\n")
    earlier = json.dumps({"index": 0, "prompt": "a red square", "seed": 0, "files": [], "grid": None}) + "\n"
    (tmp_path / "resume" / "predictions.jsonl").mkdir(parents=True)  # the merged file cannot be written
    (tmp_path / "resume" / "predictions.rank1.jsonl").write_text(earlier)  # a stopped run's line
    (tmp_path / "start" / "predict_settings.json").mkdir(parents=True)
    (tmp_path / "end" / "predictions.jsonl").mkdir(parents=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish in {DEADLINE_S} s: one waits for the other")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    got = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    files = {"resume": "predictions.jsonl", "start": "predict_settings.json", "end": "predictions.jsonl"}
    steps = {
        "resume": f"merging the earlier run's lines into {tmp_path / 'resume' / 'predictions.jsonl'}",
        "start": f"writing {tmp_path / 'start' / 'predict_settings.json'}",
        "end": f"merging the ranks' lines into {tmp_path / 'end' / 'predictions.jsonl'}",
    }
    for case, step in steps.items():  # os.replace of the written temporary file onto the directory
        name = files[case]
        want = f"IsADirectoryError: [Errno 21] Is a directory: '{tmp_path / case}/.{name}."
        assert got[0][case].startswith(want) and got[0][case].endswith(f".tmp' -> '{tmp_path / case / name}'")
        assert got[1][case] == (
            f"RuntimeError: ImageWriter: rank 0 failed while {step} ({got[0][case]}); rank 1 stops too"
        )
    # nothing written was lost: the stopped run's line and each rank's line of the finished run stay in part files
    assert (tmp_path / "resume" / "predictions.rank1.jsonl").read_text() == earlier
    parts = sorted((tmp_path / "end").glob("predictions.rank*.jsonl"))
    assert [[json.loads(line)["index"] for line in p.read_text().splitlines()] for p in parts] == [[0], [1]]
