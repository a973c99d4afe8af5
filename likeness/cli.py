"""The `likeness` command: `likeness --help` lists what it can do.

Settings come from a profile (`--profile demo-cpu`, or a TOML path) with `--set key=value`
overrides; flags are only for run mechanics. Heavy imports (torch, diffusers, prefect) happen
inside the commands that need them, so `--help` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from likeness.trainer.profiles import SettingsError, available_profiles, load_profile, settings_to_toml

app = typer.Typer(
    help="Photos of a person in, the best fine-tuned SDXL checkpoint out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ProfileOption = Annotated[str, typer.Option("--profile", "-p", help="Profile name (see `likeness profiles`) or TOML path.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a setting: --set training.epochs=3 --set concepts[0].path=photos."),
]


def _settings(profile: str, overrides: list[str] | None):
    try:
        return load_profile(profile, overrides or [])
    except SettingsError as exc:
        _fail(str(exc))


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def profiles() -> None:
    """List the ready-made profiles."""
    for name in available_profiles():
        typer.echo(name)


@app.command()
def settings(profile: ProfileOption = "demo-cpu", set_: SetOption = None) -> None:
    """Validate a profile (with overrides) and print every setting as TOML."""
    typer.echo(settings_to_toml(_settings(profile, set_)))


@app.command("import-onetrainer")
def import_onetrainer_command(
    config: Annotated[Path, typer.Argument(help="A OneTrainer config JSON (__version 6, SDXL fine-tune).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Profile TOML to write.")],
) -> None:
    """Convert a OneTrainer config into a likeness profile."""
    from likeness.trainer.onetrainer import OneTrainerImportError, import_onetrainer
    from likeness.trainer.profiles import write_profile

    try:
        result = import_onetrainer(config)
    except OneTrainerImportError as exc:
        _fail(str(exc))
    header = [f"Imported from {config} by `likeness import-onetrainer`."]
    if result.warnings:
        header += ["Not imported (OneTrainer settings likeness does not support):", *(f"  {w}" for w in result.warnings)]
    header += ["Concept roles (OneTrainer has none: check them):", *(f"  {n}" for n in result.notes)]
    write_profile(result.settings, output, "\n".join(header))
    for warning in result.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    for note in result.notes:
        typer.echo(note)
    typer.echo(f"wrote {output}")


@app.command("tiny-models")
def tiny_models(
    output: Annotated[Path, typer.Argument(help="Folder to write tiny-sdxl/ and tiny-clipseg/ into.")],
    seed: Annotated[int, typer.Option(help="Weight-init seed.")] = 0,
) -> None:
    """Build tiny SDXL-shaped and CLIPSeg models with random weights (no download), for tests and the demo."""
    from likeness.trainer.tiny_models import save_tiny_models

    built = save_tiny_models(output, seed=seed)
    typer.echo(f"SDXL pipeline: {built.sdxl}\nCLIPSeg:       {built.clipseg}")


@app.command()
def demo(profile: ProfileOption = "demo-cpu", set_: SetOption = None) -> None:
    """Run the demo on the embedded defaults: tiny models, CPU, a few minutes."""
    from likeness.demo import run_demo

    result = run_demo(_settings(profile, set_), echo=typer.echo)
    typer.echo(result.summary())


StageArgument = Annotated[str, typer.Argument(help="scan, resize, masks, captions, balance, manifest or latents.")]


@app.command()
def prepare(profile: ProfileOption = "demo-cpu", set_: SetOption = None) -> None:
    """Prepare the dataset: scan, resize, masks, captions, balancing, manifest, latent cache (each stage cached)."""
    from likeness.flows.prepare import prepare as prepare_flow

    results = _run_prepare(profile, lambda: prepare_flow(_settings(profile, set_)))
    for result in results.values():
        typer.echo(result.summary())


@app.command()
def stage(name: StageArgument, profile: ProfileOption = "demo-cpu", set_: SetOption = None) -> None:
    """Run one prepare stage alone, on what the stages before it left in the workspace."""
    from likeness.trainer.workspace import PREPARE_STAGES

    if name not in PREPARE_STAGES:
        _fail(f"unknown stage {name!r}: use one of {', '.join(PREPARE_STAGES)}")
    from likeness.flows.prepare import prepare_stage

    typer.echo(_run_prepare(profile, lambda: prepare_stage(_settings(profile, set_), name)).summary())


def _run_prepare(profile: str, run):
    """Run a prepare flow; a problem with the data or settings exits 2 with its message."""
    from likeness.trainer.stages import PrepareError

    try:
        return run()
    except PrepareError as exc:
        _fail(str(exc).replace("<profile>", profile))
