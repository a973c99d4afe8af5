"""The `likeness` command: `likeness --help` lists what it can do.

Settings come from a profile (`--profile demo-cpu`, or a TOML path) with `--set key=value`
overrides; flags are only for run mechanics. Heavy imports (torch, diffusers, prefect) happen
inside the commands that need them, so `--help` is instant.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from likeness.errors import DEBUG_VARIABLE, BadInputError, debug_enabled
from likeness.terminal import quiet_environment, quiet_libraries, quiet_prefect_console


class _Commands(TyperGroup):
    """`--debug` anywhere on the line; bad input (any `BadInputError`) answered by its message and exit 2."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if "--debug" in args:
            args = ["--debug", *(a for a in args if a != "--debug")]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BadInputError as exc:
            _fail(str(exc), exc)


app = typer.Typer(
    cls=_Commands,
    help="Photos of a person in, the best fine-tuned SDXL checkpoint out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", envvar=DEBUG_VARIABLE,
                                        help="Show tracebacks and library output (also LIKENESS_DEBUG=1).")] = False,
) -> None:
    if debug:
        os.environ[DEBUG_VARIABLE] = "1"  # the flows (and their subprocesses) read it too
    quiet_environment(debug_enabled())  # before torch, diffusers or prefect are imported
    if ctx.invoked_subcommand in FLOW_COMMANDS:
        _use_local_server()

ProfileOption = Annotated[str, typer.Option("--profile", "-p", help="Profile name (see `likeness profiles`) or TOML path.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a setting: --set training.epochs=3 --set concepts[0].path=photos."),
]


def _settings(profile: str, overrides: list[str] | None):
    from likeness.profiles import SettingsError, load_profile  # here, not at the top: `--help` stays fast

    try:
        return load_profile(profile, overrides or [])
    except SettingsError as exc:
        _fail(str(exc), exc)


def _fail(message: str, exc: BaseException | None = None) -> None:
    """The message once, in red, exit 2; the traceback too with --debug."""
    if exc is not None and debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def profiles() -> None:
    """List the ready-made profiles."""
    from likeness.profiles import available_profiles

    for name in available_profiles():
        typer.echo(name)


@app.command()
def settings(profile: ProfileOption = "demo-cpu", set_: SetOption = None) -> None:
    """Validate a profile (with overrides) and print every setting as TOML."""
    from likeness.profiles import settings_to_toml

    typer.echo(settings_to_toml(_settings(profile, set_)))


@app.command("import-onetrainer")
def import_onetrainer_command(
    config: Annotated[Path, typer.Argument(help="A OneTrainer config JSON (__version 6, SDXL fine-tune).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Profile TOML to write.")],
) -> None:
    """Convert a OneTrainer config into a likeness profile."""
    from likeness.onetrainer import OneTrainerImportError, import_onetrainer
    from likeness.profiles import write_profile

    try:
        result = import_onetrainer(config)
    except OneTrainerImportError as exc:
        _fail(str(exc), exc)
    header = [f"Imported from {config} by `likeness import-onetrainer`."]
    if result.warnings:
        header += ["Not imported (OneTrainer settings likeness does not support):", *(f"  {w}" for w in result.warnings)]
    if result.cautions:
        header += ["Imported as they were, but check (docs/onetrainer.md):", *(f"  {c}" for c in result.cautions)]
    header += ["Concept roles (OneTrainer has none: check them):", *(f"  {n}" for n in result.notes)]
    write_profile(result.settings, output, "\n".join(header))
    for warning in result.warnings + result.cautions:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    for note in result.notes:
        typer.echo(note)
    typer.echo(f"wrote {output}")


@app.command("tiny-models")
def tiny_models(
    output: Annotated[Path, typer.Argument(help="Folder to write sdxl/, sd15/, clipseg/, dino/ and clip/ into.")],
    seed: Annotated[int, typer.Option(help="Weight-init seed.")] = 0,
) -> None:
    """Build tiny SDXL, SD 1.5, CLIPSeg, DINO and CLIP models with random weights (no download), for tests and the demo."""
    from likeness.models.tiny import save_tiny_models, save_tiny_sd15

    quiet_libraries(debug_enabled())
    built = save_tiny_models(output, seed=seed)
    sd15 = save_tiny_sd15(output, seed=seed)
    typer.echo(f"SDXL pipeline:   {built.sdxl}\nSD 1.5 pipeline: {sd15}\nCLIPSeg:         {built.clipseg}\n"
               f"DINO:            {built.dino}\nCLIP:            {built.clip}")


@app.command()
def demo(profile: ProfileOption = "demo-cpu", set_: SetOption = None) -> None:
    """Run the whole pipeline on the embedded defaults: tiny models, demo photos, CPU, a few minutes."""
    from likeness.demo import run_demo

    settings = _settings(profile, set_)
    try:
        result = _run_prepare(profile, lambda: run_demo(settings, echo=typer.echo))
    except ValueError as exc:
        _fail(str(exc), exc)
    typer.echo(result.summary())


@app.command()
def run(profile: ProfileOption = "sdxl-person", set_: SetOption = None) -> None:
    """Run the whole pipeline: prepare -> train -> evaluate -> select, each stage cached."""
    from likeness.flows.pipeline import pipeline

    settings = _settings(profile, set_)
    typer.echo(_run_prepare(profile, lambda: pipeline(settings)).summary())


StageArgument = Annotated[str, typer.Argument(help="generate, scan, resize, masks, captions, balance, manifest or latents.")]


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
    from likeness.workspace import PREPARE_STAGES

    if name not in PREPARE_STAGES:
        _fail(f"unknown stage {name!r}: use one of {', '.join(PREPARE_STAGES)}")
    from likeness.flows.prepare import prepare_stage

    typer.echo(_run_prepare(profile, lambda: prepare_stage(_settings(profile, set_), name)).summary())


@app.command()
def train(profile: ProfileOption = "demo-cpu", set_: SetOption = None) -> None:
    """Fine-tune on the prepared dataset (run `likeness prepare` first); resumes from the last backup."""
    from likeness.flows.train import train as train_flow

    typer.echo(_run_prepare(profile, lambda: train_flow(_settings(profile, set_))).summary())


def _run_prepare(profile: str, run):
    """Run a flow with a quiet terminal; a problem with the data or settings exits 2 with its message."""
    debug = debug_enabled()
    quiet_libraries(debug)
    from prefect import flow  # noqa: F401  (`import prefect` alone does not yet configure its logging)

    quiet_prefect_console(debug)
    from likeness.stages import run_profile

    try:
        with run_profile(profile):  # error hints (and the UI's state message) name the profile typed
            return run()
    except BadInputError as exc:
        _fail(str(exc).replace("<profile>", profile), exc)


# Commands that run flows: they connect to the shared local server before Prefect is imported.
FLOW_COMMANDS = {"demo", "run", "prepare", "stage", "train", "evaluate", "select", "watch"}


def _use_local_server() -> None:
    """Point this command at the shared local Prefect server (started once, kept while used; see
    deployments/local_server.py) instead of a temporary one per command, unless PREFECT_API_URL is
    set, LIKENESS_SERVER=off, or Prefect is already configured in this process (tests)."""
    from likeness.deployments import local_server

    if not local_server.enabled() or os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return  # (Prefect imported already: its settings are fixed, as under the tests' harness)
    if local_server.profile_api_url():
        return
    try:
        os.environ["PREFECT_API_URL"] = local_server.connect(log=lambda m: typer.echo(m, err=True))
    except (OSError, RuntimeError) as exc:  # the command still runs, on a temporary server
        typer.secho(f"warning: {exc}", fg=typer.colors.YELLOW, err=True)


# --- operating from the Prefect UI (docs/operations.md) --------------------------------------


@app.command()
def serve(profile: ProfileOption = "demo-cpu", set_: SetOption = None,
          limit: Annotated[int | None, typer.Option(help="Most flow runs at once (default: no limit).")] = None) -> None:
    """Serve every deployment from this process (the profile is their default parameter); Ctrl-C stops."""
    import os

    # before Prefect is imported and configures its logging; the flow-run subprocesses inherit it
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "diffusers,transformers")
    from likeness.demo import missing_demo_files, write_demo_files
    from likeness.deployments.catalog import serve_all

    settings = _settings(profile, set_)
    missing = missing_demo_files(settings)
    if missing:  # the docs' first path (server -> serve -> Run) works on a fresh clone
        import logging

        typer.echo(f"[serve] the demo files are missing ({', '.join(map(str, missing))}): writing them")
        library = logging.getLogger("transformers")
        level, library.level = library.level, logging.ERROR  # its notes on building models are not ours to print
        try:
            write_demo_files(settings, echo=typer.echo)
        finally:
            library.setLevel(level)
    serve_all(settings, profile, set_ or [], limit=limit)


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the UI and API to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the UI and API.")] = 4200,
) -> None:
    """Start a local Prefect server (UI + API) bound to 127.0.0.1, analytics off; Ctrl-C stops."""
    import os
    import signal
    import sys

    from likeness.deployments.server import start_server, stop, ui_url, wait_healthy

    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: binding {host}: the UI and API (no login) are reachable from the network",
                    fg=typer.colors.YELLOW, err=True)
    proc = start_server(host, port, log=None, wait=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a terminated CLI stops its server too
    try:
        wait_healthy(host, port, proc)
        from likeness.deployments import local_server

        local_server.write_state(host, port, os.getpid())  # `likeness` commands use this server while it is up
        typer.echo(f"Prefect UI:  {ui_url(host, port)}\nAPI:         {ui_url(host, port)}/api\n"
                   f"Clients:     export PREFECT_API_URL={ui_url(host, port)}/api", color=False)
        sys.stdout.flush()
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        from likeness.deployments import local_server

        local_server.clear_state(os.getpid())
        stop(proc)


@app.command()
def watch(profile: ProfileOption = "demo-cpu", set_: SetOption = None) -> None:
    """Check the concept folders once: announce a retraining if they changed since the last training."""
    from likeness.flows.watch import watch_dataset

    result = _run_prepare(profile, lambda: watch_dataset(_settings(profile, set_)))
    state = "changed since the last training" if result["changed"] else "unchanged since the last training"
    typer.echo(f"dataset {result['fingerprint'][:12]}: {state} ({result['files']} files, {result['hashed']} hashed)"
               + ("; retraining announced" if result["announced"] else ""))


@app.command("tensorboard")
def tensorboard_command(
    profile: ProfileOption = "demo-cpu",
    set_: SetOption = None,
    start: Annotated[bool, typer.Option("--start", help="Start the viewer, bound to 127.0.0.1; Ctrl-C stops.")] = False,
    port: Annotated[int, typer.Option(help="Port of the viewer.")] = 6006,
) -> None:
    """Print where the run's TensorBoard logs are and the command that shows them; --start runs it."""
    import shlex
    import subprocess

    from likeness.trainer.tensorboard import TensorBoardMissing, require_tensorboard, viewer_command
    from likeness.workspace import Workspace

    settings = _settings(profile, set_)
    logdir = Workspace.from_settings(settings).tensorboard
    command = viewer_command(logdir, port)
    typer.echo(f"logdir:  {logdir}\ncommand: {shlex.join(command)}")
    if not settings.training.tensorboard:
        typer.secho("note: training.tensorboard is off in these settings, so training writes no logs there "
                    "(--set training.tensorboard=true)", fg=typer.colors.YELLOW, err=True)
    if start:
        try:
            require_tensorboard()
        except TensorBoardMissing as exc:
            _fail(str(exc), exc)
        typer.echo(f"TensorBoard at http://127.0.0.1:{port}/ (Ctrl-C stops)")
        try:
            subprocess.run(command, check=False)
        except KeyboardInterrupt:
            pass


CheckpointOption = Annotated[
    list[Path] | None,
    typer.Option("--checkpoint", "-c", help="A checkpoint to evaluate (repeatable); default: every one in workspace/save."),
]


@app.command()
def evaluate(profile: ProfileOption = "demo-cpu", set_: SetOption = None, checkpoint: CheckpointOption = None) -> None:
    """Grid of every checkpoint x prompts x seeds (base model first) and scores per checkpoint (cached)."""
    from likeness.flows.evaluate import evaluate as evaluate_flow
    from likeness.tasks.evaluate.grid import read_eval_table
    from likeness.workspace import Workspace

    paths = [str(p) for p in checkpoint] if checkpoint else None
    settings = _settings(profile, set_)
    results = _run_prepare(profile, lambda: evaluate_flow(settings, paths))
    for result in results.values():
        typer.echo(result.summary())
    grids = read_eval_table(results["grid"], Workspace.from_settings(settings))["extra"]["grids"]
    typer.echo(f"grids:  {', '.join(grids)}")
    typer.echo(f"scores: {results['scores'].table.with_suffix('.csv')}")


@app.command("select")
def select_command(profile: ProfileOption = "demo-cpu", set_: SetOption = None) -> None:
    """Pick the best checkpoint from the evaluation scores and copy it to the output destination."""
    from likeness.flows.evaluate import select as select_flow
    from likeness.tasks.evaluate.grid import read_eval_table
    from likeness.workspace import Workspace

    settings = _settings(profile, set_)
    extra = read_eval_table(_run_prepare(profile, lambda: select_flow(settings)), Workspace.from_settings(settings))["extra"]
    for warning in extra["warnings"]:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(extra["reason"])
    typer.echo(f"chosen: {extra['copied']}\nreport: {extra['report']}\nplot:   {extra['plot']}")
    for earlier in extra.get("removed", []):
        typer.echo(f"removed {earlier} (an earlier pick of select)")


@app.command("compare-faces")
def compare_faces_command(
    images: Annotated[list[Path], typer.Argument(help="Images (or folders of images) to score: ours, A1111's, ComfyUI's.")],
    reference: Annotated[Path, typer.Option("--reference", "-r", help="Folder of the person's photos.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for faces.csv and faces.jpg; default: <workspace>/faces.")] = None,
    profile: ProfileOption = "demo-cpu", set_: SetOption = None,
) -> None:
    """Face identity of each image against the person's photos: a table and a contact sheet with the face boxes."""
    from likeness.models.faces import FaceModelError
    from likeness.tasks.compare_faces import CompareFacesError, compare_faces

    e = _settings(profile, set_).evaluation
    folder = output or _settings(profile, set_).run.workspace / "faces"
    try:
        result = compare_faces(reference, images, folder, e.face_detector, e.face_recognizer, e.face_score_threshold)
    except (CompareFacesError, FaceModelError) as exc:
        _fail(str(exc))
    width = max(len(r["image"]) for r in result.rows)
    typer.echo(f"{'image':<{width}}  identity  face box")
    for row in result.rows:
        score = "no face" if row["identity"] is None else f"{row['identity']:.3f}"
        typer.echo(f"{row['image']:<{width}}  {score:>8}  {row['box'] or '-'}")
    typer.echo(result.summary())


@app.command("extract-lora")
def extract_lora_command(
    checkpoint: Annotated[Path, typer.Argument(help="The fine-tuned checkpoint (.safetensors single file or diffusers folder).")],
    base: Annotated[Path, typer.Option("--base", "-b", help="The base model it was trained from (single file or diffusers folder).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The LoRA .safetensors to write.")],
    rank: Annotated[int, typer.Option("--rank", "-r", help="Rank of each layer (kohya's --dim).")] = 32,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "bfloat16",
) -> None:
    """Extract a LoRA (kohya/A1111/ComfyUI layout) = CHECKPOINT - BASE, reduced to RANK per layer by SVD."""
    from likeness.models.lora_extract import extract_lora

    try:
        report = extract_lora(checkpoint, base, output, rank=rank, dtype=dtype)
    except ValueError as error:
        _fail(str(error))
    typer.echo(report.summary())
