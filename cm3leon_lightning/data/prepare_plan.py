"""``work/plan.json`` of a ``cm3leon prepare`` run: the sources and settings a preparation began with, and whether a
run with other ones may resume it (nothing built depends on what changed) or is refused, naming what changed.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from cm3leon_lightning.data import prepare_stages as st
from cm3leon_lightning.data.prepare_run import WRITE_SETTINGS
from cm3leon_lightning.data.sources import PairSource

PLAN_VERSION = 1
_BANK_SETTINGS = ("bank_factory", "bank_train_size")  # read by the bank stage only
# settings added after PLAN_VERSION 1 whose default is safe to assume where an earlier version began a preparation
_ADDED_SETTINGS = ("image_duplicate_threshold",)  # a bank built without img.npy applies no picture rule
_TOKENIZER_SETTINGS = tuple(f"settings.{k}" for k in ("tokenizer", "train_tokenizer_vocab", "tokenizer_min_frequency",
                                                     "val_fraction", "seed", "max_caption_chars"))  # fmt: skip


def _identity(source: PairSource) -> dict[str, Any]:
    """``source.describe()`` with the fingerprint of its input files (for sources whose describe() has none)."""
    ident = source.describe()
    if "fingerprint" not in ident:
        fingerprint = source.fingerprint()
        if fingerprint is not None:
            ident["fingerprint"] = fingerprint
    return ident


def _replaceable(run: st.Run, old: dict[str, Any], plan: dict[str, Any]) -> bool:
    """Whether ``plan`` may replace ``old`` in ``plan.json`` because nothing written depends on what changed.

    The retrieval rules (:data:`~cm3leon_lightning.data.prepare_run.WRITE_SETTINGS`) may always change, provided every
    part written so far records the rules it was written with: nothing but the written parts depends on them, and
    those are then written again. Bank settings (:data:`_BANK_SETTINGS`) may change while no memory bank is built and
    no part written: the encoded parts do not depend on them, so a bank stage that failed on them (an IVF bank with
    more lists than documents) is resumed with new ones. Anything else may change while no part is encoded, provided
    the tokenizer already made (if any) does not depend on it: a run that failed on its first encoded part (a model
    file that did not load) is rerun with corrected settings in the same ``--out``.
    """
    ours, theirs = plan["settings"], old.get("settings") or {}
    changed = {k for k in set(old) | set(plan) if k != "settings" and old.get(k) != plan.get(k)}
    changed |= {f"settings.{k}" for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
    if changed <= {f"settings.{k}" for k in WRITE_SETTINGS} and all(_records_selection(p) for p in _written(run)):
        return True  # the retrieval rules: the parts written with the old ones are written again (part_written)
    if (run.work / "bank" / st.DONE_FILE).exists() or any(_written(run)):
        return False
    if changed <= {f"settings.{k}" for k in _BANK_SETTINGS}:
        return True
    if any(not d.parent.name.startswith(".") for d in (run.work / "parts").glob(f"*/{st.DONE_FILE}")):
        return False  # .<part>.tmp: a part a killed run left unfinished, rebuilt anyway
    made = (run.work / "tokenizer.json").exists() or (run.work / "tokenizer.done.json").exists()
    return not made or not changed & {"plan_version", "source", "tokenizer_sha256", *_TOKENIZER_SETTINGS}


def _written(run: st.Run) -> list[Path]:
    """The stats files of the parts written so far."""
    return sorted((run.out / "stats").glob("part-*.json"))


def _records_selection(stats: Path) -> bool:
    """Whether a written part records the retrieval rules it was written with (parts of an earlier version do not:
    they could not be told stale, so those rules may not change under them)."""
    try:
        return "selection" in json.loads(stats.read_text(encoding="utf-8")).get("inputs", {})
    except (OSError, ValueError, AttributeError):
        return False


def _add_new_defaults(old: dict[str, Any], plan: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """Fill in ``old``'s settings added since it was written (:data:`_ADDED_SETTINGS`) where ``plan`` keeps their
    default, so a preparation begun by an earlier version resumes (a bank it built before image embeddings were kept
    applies the group and document rules only). Any other setting missing from ``old`` still counts as changed.

    Returns:
        The added settings ``old`` lacks that ``plan`` gives another value, with their defaults (the values that
        resume it, for the refusal to name).
    """
    theirs = old.get("settings")
    if not isinstance(theirs, dict):
        return {}
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(cfg) if f.default is not MISSING}))
    other: dict[str, Any] = {}
    for k, v in plan["settings"].items():
        if k in _ADDED_SETTINGS and k not in theirs and k in defaults:
            if v == defaults[k]:
                theirs[k] = v
            else:
                other[k] = defaults[k]
    return other


def check_plan(run: st.Run, bank_source: PairSource | None) -> None:
    cfg = run.cfg
    plan = {
        "plan_version": PLAN_VERSION,
        "source": _identity(run.sources["main"]),
        "bank_source": _identity(bank_source) if bank_source is not None else None,
        "settings": cfg.identity(),
        "vqgan_sha256": st.path_sha256(cfg.vqgan),
        "clip_weights_sha256": st.path_sha256(cfg.clip_weights) if os.path.isfile(cfg.clip_weights) else None,
        "tokenizer_sha256": st.path_sha256(cfg.tokenizer) if cfg.tokenizer else None,
    }
    plan = json.loads(json.dumps(plan))
    path = run.work / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        unrecorded = _add_new_defaults(old, plan, cfg)
        for part in ("source", "bank_source"):  # begun by a version that kept no fingerprint: cannot check the files
            ours = plan[part] if isinstance(plan[part], dict) else {}
            if isinstance(old.get(part), dict) and "fingerprint" not in old[part] and "fingerprint" in ours:
                plan[part].pop("fingerprint", None)
                warnings.warn(
                    f"{path} records no fingerprint of the {part.replace('_', ' ')}'s files (begun by an earlier "
                    "version): resuming without checking that they are unchanged",
                    stacklevel=2,
                )
        if old != plan and _replaceable(run, old, plan):  # nothing was built with what changed: take the new
            rules = sorted(k for k in WRITE_SETTINGS if plan["settings"].get(k) != (old.get("settings") or {}).get(k))
            written = _written(run)
            if rules and written:
                changes = ", ".join(f"--{k.replace('_', '-')} {old['settings'].get(k)} -> {plan['settings'][k]}"
                                    for k in rules)  # fmt: skip
                warnings.warn(
                    f"cm3leon prepare: {run.out} was written with other retrieval rules ({changes}): its "
                    f"{len(written)} written part(s) are written again with the new ones (the encoded parts and the "
                    "memory bank are kept)",
                    stacklevel=2,
                )
            st.write_json(path, plan)
            return
        if old != plan:
            diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            for part in ("source", "bank_source", "settings"):
                p_old, p_new = old.get(part), plan.get(part)
                if part in diff and isinstance(p_old, dict) and isinstance(p_new, dict):
                    diff += [f"{part}.{k}" for k in sorted(set(p_old) | set(p_new)) if p_old.get(k) != p_new.get(k)]
            restart = f"write to a new --out (or delete {run.work}) to start over"
            same = "the same ones"
            if unrecorded:  # never given to the earlier version that began it: say which values "the same ones" are
                given = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in unrecorded.items())
                same += f" (an earlier version began it, before {', '.join(unrecorded)} existed: the default, {given})"
            advice = f"resume with {same}, or write to a new --out (or delete {run.work})"
            changed = [d.split(".")[0] for d in diff if d.endswith(".fingerprint")]
            if changed:
                advice = (f"the input files changed since it began (added, removed, replaced or edited), and parts "
                          f"encoded from the old files cannot be mixed with the new ones: restore the input as it "
                          f"was to resume, or {restart}")  # fmt: skip
            raise ValueError(
                f"{run.out} holds a preparation with other inputs or settings ({', '.join(diff)}); {advice}"
            )
        return
    run.work.mkdir(parents=True, exist_ok=True)
    st.write_json(path, plan)
