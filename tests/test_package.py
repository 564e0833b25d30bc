"""Package-level contracts: the public names resolve, and the pure packages import no Lightning."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cm3leon_lightning


@pytest.mark.parametrize("name", cm3leon_lightning.__all__)
def test_public_names_resolve(name: str) -> None:
    assert getattr(cm3leon_lightning, name) is not None


def test_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        cm3leon_lightning.no_such_thing  # noqa: B018


def test_pure_packages_do_not_import_lightning() -> None:
    code = (
        "import sys\n"
        "import cm3leon_lightning.model, cm3leon_lightning.config, cm3leon_lightning.objective\n"
        "import cm3leon_lightning.tokenization.vocab, cm3leon_lightning.generation\n"
        "import cm3leon_lightning.retrieval.select, cm3leon_lightning.model.weights, cm3leon_lightning.model.hf_opt\n"
        "import cm3leon_lightning.model.pretrained, cm3leon_lightning.generation.cli, cm3leon_lightning.export\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
