"""The one settings model of likeness: every profile, CLI flag, Prefect form and OneTrainer import
goes through `Settings`.

Defaults are the reference run of MISSION.md (SDXL full fine-tune of one person, OneTrainer
settings). Every stage reads its own section (`settings.masks`, `settings.training`, ...), so a
stage's cache key can hash exactly the settings it uses.

    from likeness.settings import Settings
    settings = Settings.model_validate({"training": {"epochs": 3}})
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]
TimeUnit = Literal["NEVER", "MINUTE", "EPOCH", "STEP"]
# OneTrainer's sampler names keep OneTrainer's meaning, A1111's names keep A1111's (stack-notes.md).
SamplerName = Literal[
    "DDIM", "EULER", "EULER_A", "DPMPP", "DPMPP_SDE", "UNIPC", "EULER_KARRAS", "DPMPP_KARRAS",
    "DPMPP_SDE_KARRAS", "DPMPP_2M_KARRAS", "UNIPC_KARRAS",
    "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE", "DPM++ SDE Karras",
    "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "UniPC",
]
PositiveFloat = Annotated[float, Field(gt=0)]
UnitInterval = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- run and model ---------------------------------------------------------------------------


class RunSettings(Section):
    name: str = Field("likeness", min_length=1, description="Name of the run, used in logs and artifact keys.")
    workspace: Path = Field(Path("workspace"), description="Folder for everything a run writes: prepared images, cache, samples, checkpoints, reports.")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu, mps, cuda or cuda:N.")
    seed: int = Field(42, description="Base seed for shuffling, noise and sampling.")
    output_destination: Path | None = Field(None, description="Where the selected checkpoint is copied; default: workspace/output.")
    retries: int = Field(2, ge=0, le=20, description="Prefect retries of each stage after a transient failure.")
    retry_delay_seconds: float = Field(10.0, ge=0, description="Delay between retries.")
    workers: int = Field(0, ge=0, le=256, description="Threads for hashing, decoding and resizing images in the prepare stages; 0: one per CPU core.")
    crash_resumes: int = Field(3, ge=0, le=100, description="Times a crashed training run (killed, out of memory, lost node) is started again by itself, resuming from its last backup (the crash-resume automation of the train deployment); 0: never.")


class ModelSettings(Section):
    base_model: str = Field(
        "stabilityai/stable-diffusion-xl-base-1.0", min_length=1,
        description="A diffusers folder, a hub id, or a single-file .safetensors checkpoint (e.g. RealVisXL V4).",
    )
    model_type: Literal["auto", "sdxl", "sd15"] = Field("sdxl", description="Model family of the base model: sdxl, sd15 (Stable Diffusion 1.5: one text encoder, no time ids), or auto (detected from the diffusers folder or the single file's keys).")
    config: str | None = Field(
        None, description="Diffusers folder or hub id with the component configs, for single-file checkpoints (offline use, custom shapes).",
    )


# --- dataset ---------------------------------------------------------------------------------


class CaptionSource(Section):
    """Where a concept's captions come from (OneTrainer: concept / sample / filename)."""

    source: Literal["text", "text_file", "per_image", "filename", "captioner"] = Field(
        "per_image", description="text: one fixed caption; text_file: lines of a file; per_image: <stem>.txt beside each image; filename: the file stem; captioner: an image-to-text model.",
    )
    text: str | None = Field(None, description="The caption for source=text, e.g. 'ohwx man'.")
    path: Path | None = Field(None, description="The text file for source=text_file (one caption a line).")
    prefix: str = Field("", description="Put first in every caption, e.g. 'ohwx man' -> 'ohwx man, a man with glasses'.")
    on_missing: Literal["error", "prefix_only", "filename"] = Field(
        "error", description="What a missing per-image caption becomes: an error listing the files, the prefix alone, or the file stem.",
    )
    shuffle_tags: bool = Field(False, description="Shuffle the caption's tags, once per text variation (seeded; raise text_variations for more orders).")
    tag_delimiter: str = Field(",", min_length=1, description="What separates tags; shuffled tags are joined with ', ' (as OneTrainer).")
    keep_tags: int = Field(1, ge=0, description="The first N tags stay in place when shuffling (the token, e.g. 'ohwx man').")

    @model_validator(mode="after")
    def _needs_its_value(self) -> CaptionSource:
        if self.source == "text" and not (self.text or "").strip():
            raise ValueError("source 'text' needs a non-empty 'text' (e.g. text = 'ohwx man')")
        if self.source == "text_file" and self.path is None:
            raise ValueError("source 'text_file' needs 'path' (a text file, one caption a line)")
        return self


Toggle = Literal["off", "random", "fixed"]


class ImageAugmentations(Section):
    """A concept's image augmentations, baked into each cached image variation (OneTrainer's concept.image).

    random: a seeded draw per (seed, image, variation), strength uniform in [-max, max] (flip: half
    the variations); fixed: always, at the max strength (flip: always).
    """

    crop_jitter: bool = Field(False, description="Bucket mode: a random crop offset instead of the centre crop.")
    flip: Toggle = Field("off", description="Horizontal flip of the image and its mask.")
    rotate: Toggle = "off"
    rotate_max_angle: float = Field(0.0, ge=0, le=180, description="Degrees; image and mask rotate together.")
    brightness: Toggle = "off"
    brightness_max_strength: float = Field(0.0, ge=0, le=1, description="Factor 1 +- strength.")
    contrast: Toggle = "off"
    contrast_max_strength: float = Field(0.0, ge=0, le=1, description="Factor 1 +- strength.")
    saturation: Toggle = "off"
    saturation_max_strength: float = Field(0.0, ge=0, le=1, description="Factor 1 +- strength.")
    hue: Toggle = "off"
    hue_max_strength: float = Field(0.0, ge=0, le=0.5, description="Hue shift, in turns (0.5 = opposite colour).")
    mask_rotate_crop: bool = Field(False, description="Rotate (up to 20 degrees) and crop around the mask with 10-30 % padding.")
    circular_mask_shrink: bool = Field(False, description="Keep only a random disc of the mask.")


class Concept(Section):
    name: str = Field(min_length=1, description="Unique name of the concept.")
    path: Path = Field(description="Folder of images. Never written to.")
    role: Literal["subject", "regularization"] = Field(
        "subject", description="subject: the person being learned; regularization: generic class images.",
    )
    enabled: bool = True
    include_subdirectories: bool = False
    caption: CaptionSource = Field(default_factory=CaptionSource)
    balancing: PositiveFloat | Literal["auto"] = Field(
        1.0, description="Samples per epoch = floor(images x balancing) (REPEATS) or int(balancing) (SAMPLES); 'auto' makes a regularization concept match the subject images.",
    )
    balancing_strategy: Literal["REPEATS", "SAMPLES"] = "REPEATS"
    loss_weight: float = Field(1.0, ge=0, description="Multiplies this concept's loss.")
    validation: bool = Field(False, description="A validation concept: never trained on, only measured.")
    masks: bool | None = Field(None, description="Compute head masks for this concept; default: on for the subject, off for regularization.")
    image_variations: int = Field(1, ge=1, description="Cached image variations (augmentations) per image.")
    text_variations: int = Field(1, ge=1, description="Caption variations per image.")
    augmentations: ImageAugmentations = Field(default_factory=ImageAugmentations, description="Image augmentations (all off by default).")

    @field_validator("balancing", mode="wrap")
    @classmethod
    def _one_balancing_error(cls, value: object, handler):  # one message instead of one per union member
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"must be a number > 0 or 'auto', got {value!r}") from None

    @model_validator(mode="after")
    def _resolve_defaults(self) -> Concept:
        if self.masks is None:
            object.__setattr__(self, "masks", self.role == "subject")
        if self.balancing == "auto" and self.role != "regularization":
            raise ValueError("balancing 'auto' is only for regularization concepts; give a number for a subject")
        return self


def _reference_concepts() -> list[Concept]:
    return [
        Concept(name="person", path=Path("photos/person"), caption=CaptionSource(source="text", text="ohwx man")),
        Concept(
            name="regularization", path=Path("photos/regularization"), role="regularization",
            caption=CaptionSource(source="text", text="man"), balancing="auto",
        ),
    ]


class ResizeSettings(Section):
    resolution: int = Field(1024, ge=64, le=4096, multiple_of=64, description="Training images are fit inside resolution x resolution and padded to exactly that.")
    mode: Literal["pad", "bucket"] = Field("pad", description="pad: fit inside and pad to a square (the reference run); bucket: aspect-ratio buckets of about resolution^2 pixels, scaled to cover and cropped.")
    bucket_quantization: int = Field(64, ge=8, le=256, multiple_of=8, description="Bucket sides are multiples of this (OneTrainer: 64).")
    background: str = Field("white", min_length=1, description="Padding colour (a Pillow colour name or #rrggbb).")
    min_side: int = Field(512, ge=1, description="Images with a smaller side are reported (warning).")
    image_format: Literal["png", "webp"] = Field("png", description="Prepared images are written lossless.")


class MaskSettings(Section):
    enabled: bool = Field(True, description="Generate head masks for concepts with masks on.")
    model: str = Field("CIDAS/clipseg-rd64-refined", min_length=1, description="CLIPSeg hub id or folder.")
    prompts: list[str] = Field(["head"], min_length=1, description="Averaged after sigmoid.")
    threshold: float = Field(0.3, gt=0, lt=1)
    smooth: int = Field(5, ge=0, description="Box blur radius at model resolution.")
    expand: int = Field(10, ge=0, description="Grow the mask by this many pixels.")
    alpha: float = Field(1.0, gt=0, le=1)
    mode: Literal["replace", "fill"] = Field("replace", description="fill keeps a mask the user drew.")
    batch_size: int = Field(8, ge=1)


class CaptionerSettings(Section):
    model: str = Field("Salesforce/blip-image-captioning-large", min_length=1, description="Image-to-text model for concepts with caption source 'captioner'.")
    kind: Literal["auto", "blip", "kosmos2"] = Field("auto", description="blip: plain image-to-text (BLIP and alike); kosmos2: Kosmos-2 (e.g. microsoft/kosmos-2-patch14-224) with its grounding prompt, tags stripped, max_new_tokens >= 64; auto: from the model's config.")
    max_new_tokens: int = Field(40, ge=1)
    batch_size: int = Field(8, ge=1)


class LatentSettings(Section):
    batch_size: int = Field(4, ge=1, description="Images per VAE encode batch.")


# --- training --------------------------------------------------------------------------------


class PartSettings(Section):
    """One trainable part of the model (UNet, a text encoder, the VAE)."""

    train: bool = True
    learning_rate: PositiveFloat | None = Field(None, description="Default: optimizer.learning_rate.")
    weight_dtype: Dtype = "bfloat16"
    stop_training_after: int = Field(0, ge=0, description="With a unit other than NEVER the part trains for this many units (0: not at all).")
    stop_training_after_unit: Literal["NEVER", "EPOCH", "STEP"] = "NEVER"


class UNetSettings(PartSettings):
    learning_rate: PositiveFloat | None = 1e-5


class TextEncoderSettings(PartSettings):
    learning_rate: PositiveFloat | None = Field(3e-6, description="Higher burns the model (reference run).")
    clip_skip: int = Field(0, ge=0, le=10, description="Hidden layers skipped from the end (0 = penultimate layer, as SDXL).")


class TextEncoder2Settings(TextEncoderSettings):
    train: bool = False
    learning_rate: PositiveFloat | None = None


class VaeSettings(PartSettings):
    train: bool = False
    weight_dtype: Dtype = "float32"


class EmaSettings(Section):
    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)
    update_step_interval: int = Field(1, ge=1)
    on_cpu: bool = False


class MaskedTrainingSettings(Section):
    enabled: bool = Field(True, description="Weight the loss by the head mask.")
    unmasked_weight: UnitInterval = Field(0.6, description="Loss weight outside the mask.")
    unmasked_probability: UnitInterval = Field(0.1, description="Probability that a step ignores the mask.")
    normalize_masked_area_loss: bool = False


class LossSettings(Section):
    mse_strength: float = Field(1.0, ge=0)
    mae_strength: float = Field(0.0, ge=0)
    log_cosh_strength: float = Field(0.0, ge=0)
    weight_fn: Literal["CONSTANT", "MIN_SNR_GAMMA", "DEBIASED_ESTIMATION", "P2"] = "CONSTANT"
    weight_strength: float = Field(5.0, gt=0, description="Gamma of MIN_SNR_GAMMA and P2.")

    @model_validator(mode="after")
    def _some_loss(self) -> LossSettings:
        if self.mse_strength + self.mae_strength + self.log_cosh_strength == 0:
            raise ValueError("all loss strengths are 0: set mse_strength (or mae/log_cosh) above 0")
        return self


class NoiseSettings(Section):
    offset_noise_weight: float = Field(0.0, ge=0)
    perturbation_noise_weight: float = Field(0.0, ge=0)
    min_noising_strength: UnitInterval = 0.0
    max_noising_strength: UnitInterval = 1.0
    timestep_distribution: Literal["UNIFORM", "SIGMOID", "LOGIT_NORMAL", "HEAVY_TAIL", "COS_MAP"] = "UNIFORM"
    noising_weight: float = 0.0
    noising_bias: float = 0.5
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field("auto", description="auto: as the base model's scheduler says.")

    @model_validator(mode="after")
    def _ordered(self) -> NoiseSettings:
        if self.min_noising_strength >= self.max_noising_strength:
            raise ValueError("min_noising_strength must be below max_noising_strength")
        return self


class TrainingSettings(Section):
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    train_dtype: Dtype = Field("bfloat16", description="Autocast dtype of the forward pass.")
    output_dtype: Dtype = Field("bfloat16", description="Dtype of saved checkpoints.")
    gradient_checkpointing: bool = True
    caption_dropout_probability: UnitInterval = 0.0
    unet: UNetSettings = Field(default_factory=UNetSettings)
    text_encoder: TextEncoderSettings = Field(default_factory=TextEncoderSettings)
    text_encoder_2: TextEncoder2Settings = Field(default_factory=TextEncoder2Settings)
    vae: VaeSettings = Field(default_factory=VaeSettings)
    ema: EmaSettings = Field(default_factory=EmaSettings)
    masked_training: MaskedTrainingSettings = Field(default_factory=MaskedTrainingSettings)
    loss: LossSettings = Field(default_factory=LossSettings)
    noise: NoiseSettings = Field(default_factory=NoiseSettings)
    iterations_per_second: PositiveFloat = Field(1.13, description="For duration estimates until a real run measures it (reference: RTX 4090, batch 1).")
    tensorboard: bool = Field(False, description="Also log loss, learning rates and samples to TensorBoard (workspace/tensorboard; needs the 'tensorboard' extra).")
    max_nonfinite_steps: int = Field(3, ge=1, description="Steps with a NaN/inf loss or gradient (never applied: skipped, or rolled back to the last backup) after which training stops with an error.")

    @model_validator(mode="after")
    def _vae_frozen(self) -> TrainingSettings:
        if self.vae.train:
            raise ValueError("vae.train: training the VAE is not supported; set vae.train = false")
        if not (self.unet.train or self.text_encoder.train or self.text_encoder_2.train):
            raise ValueError("nothing to train: set unet.train, text_encoder.train or text_encoder_2.train")
        return self


class AdafactorSettings(Section):
    eps: float = Field(1e-30, gt=0)
    eps2: float = Field(1e-3, gt=0)
    clip_threshold: float = Field(1.0, gt=0)
    decay_rate: float = Field(-0.8, lt=0)
    beta1: float | None = Field(None, ge=0, lt=1, description="None: no first moment (saves memory).")
    relative_step: bool = False
    scale_parameter: bool = False
    warmup_init: bool = False


class AdamWSettings(Section):
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)


class OptimizerSettings(Section):
    name: Literal["ADAFACTOR", "ADAMW"] = "ADAFACTOR"
    learning_rate: PositiveFloat = Field(1e-5, description="Default learning rate of parts that set none.")
    weight_decay: float = Field(0.01, ge=0)
    fused_back_pass: bool = Field(True, description="Optimizer step inside backward: SDXL in ~10 GB; no gradient accumulation.")
    stochastic_rounding: bool = Field(True, description="Stochastic rounding of bf16 weight updates.")
    adafactor: AdafactorSettings = Field(default_factory=AdafactorSettings)
    adamw: AdamWSettings = Field(default_factory=AdamWSettings)


class ScheduleSettings(Section):
    scheduler: Literal["CONSTANT", "LINEAR", "COSINE", "COSINE_WITH_RESTARTS"] = Field(
        "CONSTANT", description="Learning-rate schedule after warmup; CONSTANT with warmup_steps > 0 is 'constant with warmup'.",
    )
    warmup_steps: int = Field(200, ge=0)
    cycles: float = Field(1.0, gt=0, description="Cycles of COSINE_WITH_RESTARTS.")


# --- sampling, saving, evaluation ------------------------------------------------------------


class SamplePrompt(Section):
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    seed: int = 42
    random_seed: bool = False


NEGATIVE_PROMPT = (
    "blurry, grainy, low-res, cartoonish, overexposed, unrealistic, digital artifacts, "
    "unnatural lighting, over-sharpened, harsh shadows"
)


class GenerationSettings(Section):
    """How images are generated, shared by samples during training and evaluation grids."""

    steps: int = Field(40, ge=1, le=500)
    cfg_scale: float = Field(7.0, ge=0)
    sampler: SamplerName = "DPMPP_SDE_KARRAS"
    resolution: int | None = Field(None, ge=64, multiple_of=64, description="Default: the training resolution.")


class SamplingSettings(GenerationSettings):
    every: int = Field(10, ge=1)
    unit: TimeUnit = "MINUTE"
    at_start: bool = Field(True, description="Also sample before the first step.")
    image_format: Literal["jpg", "png"] = "jpg"
    prompts: list[SamplePrompt] = Field(default_factory=lambda: [
        SamplePrompt(prompt="photo of ohwx man lying on the floor of a penthouse, surrounded by kittens, looking into the camera, natural lighting", negative_prompt=NEGATIVE_PROMPT, random_seed=True),
        SamplePrompt(prompt="photo of ohwx man in a black suit, looking into the camera, natural lighting", negative_prompt=NEGATIVE_PROMPT, random_seed=True),
    ])


class SavingSettings(Section):
    every: int = Field(15, ge=1)
    unit: TimeUnit = "EPOCH"
    skip_first: int = Field(0, ge=0, description="No saves during the first N units.")
    prefix: str = Field("person", min_length=1, pattern=r"^[\w.-]+$", description="Checkpoints are <prefix>-<epoch>.safetensors.")
    format: Literal["safetensors", "diffusers"] = Field("safetensors", description="safetensors: one file A1111/ComfyUI load.")


class BackupSettings(Section):
    every: int = Field(30, ge=1)
    unit: TimeUnit = "MINUTE"
    rolling_count: int = Field(3, ge=1)
    before_save: bool = False


class SelectionSettings(Section):
    """How `likeness select` picks one checkpoint from the evaluation scores."""

    rule: Literal["likeness", "validation_loss", "weighted", "epoch"] = Field(
        "likeness", description="likeness: highest mean of the enabled likeness metrics (dino, clip_i) among checkpoints within both tolerances; validation_loss: lowest validation loss within the tolerances; weighted: highest weighted score within the tolerances; epoch: the checkpoint of `epoch`.",
    )
    fidelity_tolerance: float = Field(0.02, ge=0, le=2, description="A checkpoint passes while its prompt fidelity (clip_t) >= the base model's minus this (absolute, cosine units).")
    class_prior_tolerance: float = Field(0.10, ge=0, le=100, description="A checkpoint passes while its class-prior loss <= the base model's x (1 + this) (relative).")
    weights: dict[Literal["dino", "clip_i", "clip_t", "class_prior_loss", "validation_loss"], Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"dino": 1.0, "clip_i": 1.0, "clip_t": 1.0, "class_prior_loss": 0.0, "validation_loss": 0.0},
        description="Rule weighted: score = sum of weight x metric, losses subtracted (weights >= 0).",
    )
    epoch: int | None = Field(None, ge=0, description="Rule epoch: the checkpoint saved at this epoch.")

    @model_validator(mode="after")
    def _epoch_given(self) -> SelectionSettings:
        if self.rule == "epoch" and self.epoch is None:
            raise ValueError("rule 'epoch' needs 'epoch' (the epoch of the checkpoint to keep)")
        return self


class EvaluationSettings(GenerationSettings):
    prompts: list[str] = Field(
        ["photo of ohwx man", "photo of ohwx man in a black suit", "photo of ohwx man lying on the floor with kittens"],
        min_length=1,
    )
    negative_prompt: str = NEGATIVE_PROMPT
    seeds_per_prompt: int = Field(4, ge=1, le=64)
    seed: int = Field(0, description="First seed; prompt i uses seeds seed..seed+seeds_per_prompt-1 for every checkpoint.")
    metrics: list[Literal["dino", "clip_i", "clip_t", "class_prior_loss", "validation_loss"]] = Field(
        ["dino", "clip_i", "clip_t", "class_prior_loss", "validation_loss"],
    )
    class_prior_images: int = Field(
        8, ge=0, le=1000,
        description="Regularization images held out of training (never trained on) to measure class-prior loss; 0: none.",
    )
    dino_model: str = Field("facebook/dino-vits16", min_length=1, description="DINO ViT (hub id or folder) for the dino likeness metric (CLS token).")
    clip_model: str = Field("openai/clip-vit-large-patch14", min_length=1, description="CLIP (hub id or folder) for the clip_i likeness and clip_t prompt-fidelity metrics.")
    head_crops: bool = Field(True, description="Score likeness on head crops: the mask's box on training photos, CLIPSeg (masks.model) on generated images, else a centre crop.")
    loss_timesteps: int = Field(8, ge=1, le=1000, description="Fixed, evenly spaced timesteps of the deterministic class-prior and validation losses.")
    selection: SelectionSettings = Field(default_factory=SelectionSettings)


class WatchSettings(Section):
    """The dataset watcher: how often it fingerprints the concept folders (retrain only on a change)."""

    interval_minutes: float = Field(60.0, gt=0, le=10080, description="Minutes between two checks of the concept folders (ignored when cron is set).")
    cron: str | None = Field(None, min_length=9, description="A cron schedule for the checks instead of the interval, e.g. '0 * * * *'.")


# --- the whole -------------------------------------------------------------------------------


class Settings(Section):
    """Everything a run needs. Sections mirror the pipeline's stages."""

    run: RunSettings = Field(default_factory=RunSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    concepts: list[Concept] = Field(default_factory=_reference_concepts, min_length=1)
    resize: ResizeSettings = Field(default_factory=ResizeSettings)
    masks: MaskSettings = Field(default_factory=MaskSettings)
    captioner: CaptionerSettings = Field(default_factory=CaptionerSettings)
    latents: LatentSettings = Field(default_factory=LatentSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    saving: SavingSettings = Field(default_factory=SavingSettings)
    backups: BackupSettings = Field(default_factory=BackupSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        names = [c.name for c in self.concepts]
        if len(set(names)) != len(names):
            raise ValueError(f"concepts: names must be unique, got {names}")
        training = [c for c in self.concepts if c.enabled and not c.validation]
        if not training:
            raise ValueError("concepts: no enabled training concept (all are disabled or validation concepts)")
        if any(c.balancing == "auto" for c in training) and not any(c.role == "subject" for c in training):
            raise ValueError("concepts: balancing 'auto' needs an enabled subject concept to balance against")
        if self.optimizer.fused_back_pass and self.training.gradient_accumulation_steps > 1:
            raise ValueError(
                "optimizer.fused_back_pass cannot be combined with training.gradient_accumulation_steps > 1: "
                "turn one of them off"
            )
        return self

    @property
    def output_destination(self) -> Path:
        return self.run.output_destination or self.run.workspace / "output"
