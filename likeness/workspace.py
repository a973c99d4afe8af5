"""The workspace layout: every path a run writes, derived from `settings.run.workspace`.

One place for the names, so the prepare, training and evaluation stages agree on them:

    workspace/
      prepared/<concept>/<stem>.png          prepared image (fit + pad to resolution, RGB, lossless)
      prepared/<concept>/<stem>-masklabel.png  its mask (L, same size), when the concept has one
      prepared/<concept>/<stem>.txt          its caption, one line per text variation
      manifest.csv                           the validated table later stages read (manifest.py)
      latents.csv                            manifest id -> latent / text cache files (latents.py)
      cache/latents/<key>.safetensors        VAE latents + downscaled masks, keyed by content
      cache/text/<key>.safetensors           frozen text-encoder outputs, keyed by caption + encoder
      reports/                               scan-report.md, masks-report.md, balance.md, speed.json
      prepare/<stage>.json                   each prepare stage's table (what the next stage reads)
      prepare/items/<stage>/<key>.json       per-image results, so one changed photo redoes one item
      prepare/user-masks/<concept>/<stem>.png  masks the user drew, fit + padded like their image
      prepare/hash-index.json                size + mtime -> content hash, to skip re-hashing
      prefect/                               Prefect's persisted task results (the stage cache)
      samples/ save/ backup/ output/         training and evaluation outputs
      tensorboard/                           TensorBoard event files (training.tensorboard)

`prepared/` is laid out like a OneTrainer concept folder, so it can be opened there as well.

    ws = Workspace.from_settings(settings)
    ws.prepared_image("person", "img001")  # workspace/prepared/person/img001.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from likeness.settings import Settings

PREPARE_STAGES = ("scan", "resize", "masks", "captions", "balance", "manifest", "latents")


@dataclass(frozen=True)
class Workspace:
    """Paths inside one run's workspace folder (absolute, so tables stay valid from any cwd)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @classmethod
    def from_settings(cls, settings: Settings) -> Workspace:
        return cls(settings.run.workspace)

    # --- prepared dataset ---------------------------------------------------------------------

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    def prepared_image(self, concept: str, stem: str, suffix: str = ".png") -> Path:
        return self.prepared / concept / f"{stem}{suffix}"

    def prepared_mask(self, concept: str, stem: str) -> Path:
        return self.prepared / concept / f"{stem}-masklabel.png"

    def prepared_caption(self, concept: str, stem: str) -> Path:
        return self.prepared / concept / f"{stem}.txt"

    def user_mask(self, concept: str, stem: str) -> Path:
        return self.prepare_dir / "user-masks" / concept / f"{stem}.png"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def latents_index(self) -> Path:
        return self.root / "latents.csv"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def latent_cache(self) -> Path:
        return self.cache / "latents"

    @property
    def text_cache(self) -> Path:
        return self.cache / "text"

    # --- stage bookkeeping --------------------------------------------------------------------

    @property
    def prepare_dir(self) -> Path:
        return self.root / "prepare"

    def table(self, stage: str) -> Path:
        """The table a prepare stage writes for the next one (with the sha256 of each file it wrote)."""
        return self.prepare_dir / f"{stage}.json"

    def item_records(self, stage: str) -> Path:
        return self.prepare_dir / "items" / stage

    @property
    def hash_index(self) -> Path:
        return self.prepare_dir / "hash-index.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def report(self, name: str) -> Path:
        return self.reports / name

    @property
    def measured_speed(self) -> Path:
        """Training writes {"iterations_per_second": x} here; duration estimates prefer it."""
        return self.reports / "speed.json"

    @property
    def prefect_results(self) -> Path:
        return self.root / "prefect"

    # --- training and evaluation --------------------------------------------------------------

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.root / "save"

    @property
    def backups(self) -> Path:
        return self.root / "backup"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (when training.tensorboard is on): `likeness tensorboard` shows them."""
        return self.root / "tensorboard"
