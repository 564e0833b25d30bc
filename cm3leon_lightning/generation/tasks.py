"""The image-to-image tasks of paper table 5 that ``edit_image`` decodes: their task prefixes and guidance.

Each has the template ``prefix <break> image <break> text <break> image``: text-guided editing (the text is the
instruction) and image-to-image grounded generation (the first image holds edges, a segmentation, a pose ...; the text
is the caption). :mod:`cm3leon_lightning.data.sft` builds its training templates from these prefixes, so what a model
is instruction-tuned on and what ``cm3leon generate --edit`` / ``cm3leon serve`` put before the image stay the same.
This module imports nothing.
"""

EDIT_PREFIX = "Edit first image following the instruction"
"""The prefix of the ``edit`` task (InstructPix2Pix data)."""

GROUNDED_FEATURES = {
    "edge": "canny edge features",
    "seg": "a segmentation map",
    "hed": "hed features",
    "pose": "openpose features",
    "depth": "depth features",
    "norm": "3D norm features",
    "scribble": "children's scribbles",
}
"""The grounded-generation tasks ``<name>_to_image`` and the features their first image holds."""

TASK_PREFIXES = {
    "edit": EDIT_PREFIX,
    **{f"{name}_to_image": f"Make high quality image from {what}" for name, what in GROUNDED_FEATURES.items()},
}
"""Task -> the text its template puts before the first image."""

IMAGE_TASKS = tuple(TASK_PREFIXES)
"""The task names: ``edit`` and the seven ``*_to_image`` tasks."""

TASK_GUIDANCE = {task: (7.5, 1.5) if task == "edit" else (3.0, 3.0) for task in IMAGE_TASKS}
"""Paper section 4.1's guidance per task as ``(text_cfg, image_cfg)``: editing 7.5 / 1.5; grounded generation "a
single CFG value of 3" (equal scales make ``dual_cfg_logits`` plain CFG between the full and the empty prompt)."""


def task_prefix(task: str) -> str:
    """The prefix of one of :data:`IMAGE_TASKS` (raises ValueError naming the tasks for another name)."""
    if task not in TASK_PREFIXES:
        raise ValueError(f"task must be one of {IMAGE_TASKS}, got {task!r}")
    return TASK_PREFIXES[task]
