"""The ``graft`` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from difflib import get_close_matches
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from graft.cli.help_format import HelpFormatter
from graft.cli.predict import add_command as add_predict_command
from graft.cli.registry import add_commands as add_registry_commands
from graft.config.params import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, DEFAULT_PARAMS, load_params
from graft.config.settings import (
    DEFAULT_DECODE_MEMORY_MB,
    DEFAULT_DECODE_TIMEOUT_S,
    MIN_DECODE_MEMORY_MB,
)
from graft.errors import GraftError, run_main
from graft.processes import env_with_this_python
from graft.registry.package_layout import CARD_MARKDOWN

REJECTED_EXIT = 3  # graft verify --fail-on-rejected: some file was rejected (1: an error)


def _check(arguments: argparse.Namespace) -> None:
    # torchvision only when asked for
    from graft.config.checks import check_machine, source_warnings

    params = load_params(arguments.params)
    check_machine(params, arguments.params.parent, origin=str(arguments.params))
    for key, message in source_warnings(params, arguments.params.parent):
        print(f"warning: {key}: {message}", file=sys.stderr)
    print(f"{arguments.params}: all settings valid; source folders and architecture found")


def _demo(arguments: argparse.Namespace) -> None:
    from graft.data.demo import write_demo  # scikit-learn only when asked for

    counts = write_demo(arguments.out)
    print(f"demo written to {arguments.out}: {counts}")


def _verify(arguments: argparse.Namespace) -> None:
    from graft.data.verify import CheckSettings, verify_folder

    if not arguments.folder.is_dir():
        raise GraftError(f"{arguments.folder} is not a folder")
    if arguments.decode_memory_mb < MIN_DECODE_MEMORY_MB or arguments.decode_timeout_s <= 0:
        raise GraftError(
            f"--decode-memory-mb must be at least {MIN_DECODE_MEMORY_MB} (a decoding process's "
            "own libraries take about 110 MiB) and --decode-timeout-s above 0"
        )
    settings = CheckSettings(
        arguments.min_side, arguments.max_pixels,
        arguments.decode_memory_mb, arguments.decode_timeout_s,
    )  # fmt: skip
    report = verify_folder(arguments.folder, settings, workers=arguments.workers)
    if arguments.json:
        json.dump([record._asdict() for record in report.records], sys.stdout, indent=1)
        print()
    else:
        print("path\tlabel\tverdict\treason\tsha256")
        for r in report.records:
            print(f"{r.path}\t{r.label}\t{r.verdict}\t{r.reason}\t{r.sha256 or ''}")
    verdicts = Counter(record.verdict for record in report.records)
    counts = ", ".join(f"{verdict} {n}" for verdict, n in verdicts.most_common())
    skipped = sum(report.skipped.values())
    print(
        f"{len(report.records)} files in {arguments.folder}: {counts or 'none'}; "
        f"{skipped} hidden or stray files skipped",
        file=sys.stderr,
    )
    if arguments.fail_on_rejected:
        from graft.data.ingest import NOT_COUNTED  # the rejection budget's rule

        rejected = sum(n for verdict, n in verdicts.items() if verdict not in NOT_COUNTED)
        if rejected:
            print(
                f"{rejected} files rejected: exit status {REJECTED_EXIT} (--fail-on-rejected)",
                file=sys.stderr,
            )
            sys.exit(REJECTED_EXIT)


def use_project_code(root: Path) -> None:
    """Make the project's ``flows`` importable here and in the flow-run processes started here.

    The Prefect flow lives in the project (``flows/``), not in the installed library, so a user
    can change it without reinstalling; ``graft run`` and ``graft serve`` find it under ``root``.
    Puts ``root`` first on ``sys.path`` and on ``PYTHONPATH`` (for child processes). Raises
    GraftError when ``root`` holds no ``flows/pipeline.py`` (not a graft project root).
    """
    if not (root / "flows" / "pipeline.py").is_file():
        raise GraftError(
            f"{root.resolve()} is not a graft project root (no flows/pipeline.py): "
            "run from the project root or pass --root"
        )
    project = str(root.resolve())
    if project not in sys.path:
        sys.path.insert(0, project)
    inherited = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    os.environ["PYTHONPATH"] = os.pathsep.join([project, *(e for e in inherited if e != project)])


def _run(arguments: argparse.Namespace) -> None:
    # Ctrl-C, SIGTERM and SIGHUP (a closed terminal) all unwind through the finally blocks
    # below: the running stage's process tree is stopped, the run reported, and a temporary
    # server stopped. Only the first counts; later ones would cut that clean-up short.
    raise_on_signals(STOP_SIGNALS, Interrupted, once=True, signal_of=_stop_signal, quiet=True)
    phase = ["before the flow run started; nothing ran"]  # how far it got, for an interrupt
    try:
        results = _run_flow(arguments, phase)
    except BaseException as stop:
        signum = _stop_signal(stop)
        if signum is None:
            raise
        name = signal.Signals(signum).name
        print(f"interrupted by {name}: {_stopped(stop, phase[0])}", file=sys.stderr)
        sys.exit(128 + signum)  # the shell's convention: 130 for Ctrl-C
    for result in results.stages:
        # where: this workspace, a work tree of it, or "pool <name>", a work pool's worker
        where = {"workspace": "", "worktree": " in a work tree"}.get(
            result.where, f" on work {result.where}"
        )
        state = f"ran{where}" if result.ran else "up to date (DVC cache)"
        print(f"{result.stage}: {state} ({result.seconds:.1f}s)")
    for line in _where_to_look(arguments, results):
        print(line)


@dataclass(frozen=True)
class _RunOutcome:
    """What a finished ``graft run`` reports: the ``stages`` (StageResult, in order), the run's
    ``url`` in the Prefect UI (None on a temporary server, which is gone once the run ends) and
    whether the run covered ``every_stage`` of dvc.yaml."""

    stages: list[Any]
    url: str | None
    every_stage: bool


def _run_flow(arguments: argparse.Namespace, phase: list[str]) -> _RunOutcome:
    """The pipeline flow as ``graft run`` runs it, against a temporary Prefect server when
    PREFECT_API_URL is not set; ``phase[0]`` says how far it got. Raises GraftError, before any
    work, for stage names that are not dvc.yaml's (see :func:`_publish_stage`), and, with the
    one line that says why, for a failed stage, a refused param or placement, a busy
    workspace, or a server that did not start."""
    use_project_code(arguments.root)
    publish_stage, stage_names = _publish_stage(arguments)
    from prefect.utilities.urls import url_for  # Prefect only when asked for

    from flows.local_server import ServerDidNotStart, run_api
    from flows.pipeline import EXPECTED_FAILURES, pipeline

    flow_runs: list[Any] = []  # the flow run, for its URL: the call returns only its result

    def remember_the_run_for_its_url(flow: object, flow_run: object, state: object) -> None:
        flow_runs.append(flow_run)

    flow = pipeline.with_options(
        on_completion=[*pipeline.on_completion_hooks, remember_the_run_for_its_url]
    )
    log = arguments.root / ".graft" / "prefect-server.log"
    try:
        with run_api(log, announce=lambda line: print(line, file=sys.stderr)) as temporary:
            phase[0] = "the flow run is marked Crashed"
            results = flow(
                root=str(arguments.root),
                stages=arguments.stages or None,
                force=arguments.force,
                publish=arguments.publish,
                publish_bump=arguments.bump,
                publish_stage=publish_stage,
            )
            phase[0] = "after the flow run finished"
            # Prefect's own URL of the run, from PREFECT_UI_URL (or PREFECT_API_URL's server)
            url = url_for(flow_runs[0]) if flow_runs and temporary is None else None
    except (*EXPECTED_FAILURES, ServerDidNotStart) as error:
        # One line for a stage (its output is in the log above); a params error lists each key.
        raise GraftError(str(error)) from None
    stages = results if isinstance(results, list) else []
    every_stage = not arguments.stages or {r.stage for r in stages} >= set(stage_names)
    return _RunOutcome(stages, url or None, every_stage)


def _publish_stage(arguments: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The registry stage ``graft run`` assigns with --publish, and dvc.yaml's stage names
    (in DVC's order; read only when stage names were given, else empty).

    Raises GraftError in one line, before any work: for a stage name that dvc.yaml lacks
    (naming the ones it has), for a DVC stage given as --stage (the deprecated name of
    --publish-stage, which warns), and for --publish-stage without --publish.
    """
    publish_stage = arguments.publish_stage
    stage_names: list[str] = []
    if arguments.stages or arguments.stage is not None:
        from dvc.exceptions import DvcException

        from flows.stages import stage_order

        try:
            stage_names = stage_order(arguments.root)
        except DvcException as error:
            raise GraftError(f"{arguments.root.resolve()}: {error}") from None
    unknown = [name for name in arguments.stages if name not in stage_names]
    if unknown:
        close = get_close_matches(unknown[0], stage_names, n=1)
        raise GraftError(
            f"{arguments.root / 'dvc.yaml'} has no stage {' or '.join(map(repr, unknown))}"
            f"{f' (did you mean {close[0]}?)' if close else ''}; "
            f"its stages: {', '.join(stage_names)}"
        )
    if arguments.stage is not None:
        if arguments.stage in stage_names:
            raise GraftError(
                f"--stage {arguments.stage} names a DVC stage: give DVC stages as arguments "
                f"(graft run {arguments.stage}); --publish-stage (formerly --stage) is the "
                "registry stage, such as dev or prod, that --publish assigns"
            )
        if publish_stage is not None:
            raise GraftError("give --publish-stage only: --stage is its deprecated name")
        print(
            "warning: --stage is deprecated: use --publish-stage (the registry stage, such as "
            "dev or prod, that --publish assigns)",
            file=sys.stderr,
        )
        publish_stage = arguments.stage
    if publish_stage is not None and not arguments.publish:
        raise GraftError(
            f"--publish-stage {publish_stage} assigns a registry stage to the version that "
            "--publish makes: add --publish"
        )
    return publish_stage, stage_names


def _where_to_look(arguments: argparse.Namespace, outcome: _RunOutcome) -> list[str]:
    """The lines that end a successful ``graft run``: where its run and its model card are."""
    lines = []
    if outcome.url:
        lines.append(f"the run in the Prefect UI: {outcome.url}")
    params = load_params(arguments.root / "params.yaml")
    card = arguments.root / params.paths.registry.package / CARD_MARKDOWN
    if outcome.every_stage and card.is_file():  # else the card may predate this run's changes
        lines.append(f"the model card: {card}")
        if not arguments.publish:
            lines.append("publish it as a version: graft publish")
    return lines


def _stopped(stop: BaseException, phase: str) -> str:
    """What an interrupt stopped, for its one line: the stage, if one was running."""
    from flows.stages import stopped_stage

    stage = stopped_stage(stop)
    if stage is None:
        return phase
    return f"stage {stage} was stopped with its whole process tree; {phase}"


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) raised as an exception in the main thread.

    A KeyboardInterrupt, so that code which treats Ctrl-C specially (Prefect marks the run
    Crashed) treats every stop signal alike. ``signum``: the signal's number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop_signal(error: BaseException) -> int | None:
    """The signal behind ``error`` when it is an interrupt (ours, Ctrl-C's, or the
    TerminationSignal Prefect raises for SIGTERM during a flow run), else None."""
    prefect_exceptions = sys.modules.get("prefect.exceptions")  # not imported: not raised
    if isinstance(error, Interrupted):
        return error.signum
    if prefect_exceptions and isinstance(error, prefect_exceptions.TerminationSignal):
        return int(error.signal)
    if isinstance(error, KeyboardInterrupt):
        return signal.SIGINT
    return None


def raise_on_signals(
    signals: Iterable[int],
    exception: Callable[[int], BaseException],
    *,
    once: bool = False,
    redeliver_after_s: float = 0.05,
    signal_of: Callable[[BaseException], int | None] | None = None,
    quiet: bool = False,
) -> None:
    """From now on, each of ``signals`` raises ``exception(signum)`` in the main thread, so
    that ``finally`` blocks run, until another handler replaces this one. With ``once``, only
    the first one does and later ones are ignored: the process is already on its way out,
    and an exception in the middle of its clean-up (stopping child processes, reporting how
    the run ended) would leave that half done.

    Python runs a signal handler between any two bytecodes of the main thread, inside an
    object's finalizer (``__del__``) too, where it reports the exception as unraisable and
    drops it: the process would go on as if never signalled. A dropped exception is therefore
    signalled again ``redeliver_after_s`` seconds later, from another thread, by when the main
    thread has left the finalizer. ``signal_of`` extends this to exceptions that other
    handlers raise for a signal (Prefect's TerminationSignal, for SIGTERM during a flow run):
    it returns the signal behind an exception, or None. Replaces ``sys.unraisablehook`` with
    one that does this and then calls the previous hook, which prints the dropped exception
    with its traceback; with ``quiet``, not for one that is signalled again. Returns nothing.
    Raises ValueError outside the main thread.
    """
    report = sys.unraisablehook
    raised: list[tuple[BaseException, int]] = []  # the last exception raised, and its signal

    def handler(signum: int, frame: object) -> None:
        if once and raised:
            return
        error = exception(signum)
        raised[:] = [(error, signum)]
        raise error

    def redeliver_if_dropped(unraisable: sys.UnraisableHookArgs) -> None:
        dropped = unraisable.exc_value
        signum = None
        if raised and dropped is raised[0][0]:
            signum = raised[0][1]
            raised.clear()  # not delivered after all: the next one must raise
        elif dropped is not None and signal_of is not None:
            signum = signal_of(dropped)
        if signum is not None:
            redelivery = threading.Timer(redeliver_after_s, os.kill, (os.getpid(), signum))
            redelivery.daemon = True  # never what keeps the process alive
            redelivery.start()
            if quiet:
                return
        report(unraisable)

    for signum in signals:
        signal.signal(signum, handler)
    sys.unraisablehook = redeliver_if_dropped


def exit_cleanly_on_sigterm(redeliver_after_s: float = 0.05) -> None:
    """From now on, SIGTERM raises SystemExit(0) in the main thread, so that ``finally`` blocks
    run, until another handler replaces this one; a SIGTERM that lands in a finalizer is
    redelivered (see :func:`raise_on_signals`). Returns nothing; raises nothing."""
    raise_on_signals([signal.SIGTERM], lambda _: SystemExit(0), redeliver_after_s=redeliver_after_s)


def _serve(arguments: argparse.Namespace) -> None:
    from prefect.settings import PREFECT_API_URL  # Prefect only when asked for

    use_project_code(arguments.root)
    from flows.serve import DeploymentSpecError, serve_deployments

    if not PREFECT_API_URL.value():  # env var or Prefect profile
        print(
            "PREFECT_API_URL is not set: serving against a temporary server that forgets "
            "its runs when stopped; start `prefect server start` and set PREFECT_API_URL",
            file=sys.stderr,
        )
    # Prefect's runner exits cleanly on SIGTERM, but only installs its handler after it has
    # registered the deployments and announced them. Until then SIGTERM would kill this process
    # outright and skip serve_deployments' pause of the schedules, leaving them active with
    # nothing serving them. As SystemExit(0) it unwinds through that pause instead.
    exit_cleanly_on_sigterm()
    try:
        serve_deployments(arguments.root)
    except DeploymentSpecError as error:
        raise GraftError(str(error)) from None


_Subcommands = argparse._SubParsersAction  # what add_subparsers returns


def _worker(arguments: argparse.Namespace) -> None:
    """Become a Prefect worker of a process work pool in this clone: its placed stages run
    here (flows/placement.py reads ``GRAFT_WORKSPACE``). Replaces this process."""
    from prefect.settings import PREFECT_API_URL  # Prefect only when asked for

    if not PREFECT_API_URL.value():
        raise GraftError(
            "PREFECT_API_URL is not set: a worker must poll the Prefect server the "
            "orchestrating runs use (export PREFECT_API_URL=http://<server>:4200/api)"
        )
    root = arguments.root.resolve()
    if not (root / "dvc.yaml").is_file() or not (root / ".git").exists():
        raise GraftError(f"{root} is not a clone of a graft project (no dvc.yaml or .git)")
    env = {**env_with_this_python(), "GRAFT_WORKSPACE": str(root)}  # flows/placement.py
    # Heartbeats let the server tell a dead worker's runs apart (flows/crash_detection.py).
    env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", arguments.pool]
    command += ["--type", "process"]
    print(f"graft worker: placed stages of pool {arguments.pool!r} run in {root}", flush=True)
    os.chdir(root)
    os.execve(sys.executable, command, env)


def _command(
    commands: _Subcommands[argparse.ArgumentParser],
    name: str,
    handler: Callable[[argparse.Namespace], None],
    help: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """Add ``graft <name>``, run by ``handler`` with the parsed arguments; return its parser."""
    parser = commands.add_parser(
        name, help=help, description=description, formatter_class=HelpFormatter
    )
    parser.set_defaults(handler=handler)
    return parser


ROOT_HELP = "the project root: the folder holding dvc.yaml and params.yaml"

RUN_DESCRIPTION = """\
Runs the stages of dvc.yaml as one Prefect flow run, a task per stage. DVC decides what is \
stale, exactly as for `dvc repro`; a stage that is up to date is not run again.
Uses the Prefect server at PREFECT_API_URL when set, otherwise a temporary local one for this \
run. When the run succeeds, says where to look next: the run in the Prefect UI (with \
PREFECT_API_URL) and the model card.

examples:
  graft run                                   # the whole pipeline
  graft run finetune --force                  # finetune and what it needs, even if up to date
  graft run --publish --publish-stage dev     # then publish the model, assigned to stage dev
"""

VERIFY_DESCRIPTION = f"""\
Verifies every file of FOLDER, laid out as FOLDER/<class>/<image> (sub-folders allowed), as the \
ingest stage does: a full decode through training's own path, each file in a worker process \
under a memory and time budget. Reads only: nothing in FOLDER is changed.

output, one line per file, tab-separated, after a header line:
  path     the file, relative to FOLDER (forward slashes; bytes that are not UTF-8 as \\xNN)
  label    its class: the folder under FOLDER that holds it
  verdict  accepted, or why not: zero_byte, not_image, corrupt, unsupported, too_small,
           too_large, timeout, unreadable, duplicate, label_conflict (README: Ingest verdicts)
  reason   what exactly was wrong (for accepted files: empty, or a warning)
  sha256   the content hash, 64 hex digits (empty when the file could not be read)
With --json, a JSON list instead: one object per file with these five keys and bytes (file \
size), width and height (pixels, from the header), mode and format (as Pillow names them) and \
phash (accepted images: 64-bit perceptual hash, 16 hex digits); null where unknown.
On stderr, one summary line: files per verdict, and hidden or stray files skipped.

exit status: 0; with --fail-on-rejected, {REJECTED_EXIT} when any file is rejected (every \
verdict but accepted and duplicate, as ingest's rejection budget counts them); 1 for an error, \
2 for bad arguments.
"""


def _add_flow_commands(commands: _Subcommands[argparse.ArgumentParser]) -> None:
    """Add ``run``, ``serve`` and ``worker``: the pipeline as a Prefect flow, run now, on
    schedules, or on other machines."""
    run = _command(
        commands,
        "run",
        _run,
        help="run the pipeline as a Prefect flow (one task per DVC stage)",
        description=RUN_DESCRIPTION,
    )
    run.add_argument(
        "stages",
        nargs="*",
        metavar="STAGE",
        help="only these stages of dvc.yaml and what they depend on (default: every stage); "
        "`dvc stage list` names them, and an unknown name is refused with the list",
    )
    run.add_argument(
        "--force", action="store_true", help="run the stages even when DVC finds them up to date"
    )
    run.add_argument("--root", type=Path, default=Path("."), help=ROOT_HELP)
    run.add_argument(
        "--publish",
        action="store_true",
        help="then publish the model as the next version, as `graft publish` does",
    )
    run.add_argument(
        "--bump",
        choices=["patch", "minor", "major"],
        default="patch",
        help="with --publish: which part of the last version's vX.Y.Z goes up",
    )
    run.add_argument(
        "--publish-stage",
        metavar="NAME",
        help="with --publish: also assign the new version this registry stage (e.g. dev, prod; "
        "a GTO stage tag), not a DVC stage",
    )
    run.add_argument(
        "--stage",
        metavar="NAME",
        help="deprecated name of --publish-stage (warns; a DVC stage name is refused)",
    )

    serve = _command(
        commands,
        "serve",
        _serve,
        help="serve prefect.yaml's deployments from this machine (no work pool or worker)",
        description="Registers the deployments of prefect.yaml (schedules, parameters, "
        "concurrency limits) with the Prefect server at PREFECT_API_URL and runs their flow "
        "runs here, one at a time, until stopped (SIGTERM). Their schedules are paused on the "
        "way out and restored by the next `graft serve`.",
    )
    serve.add_argument("--root", type=Path, default=Path("."), help=ROOT_HELP)

    worker = _command(
        commands,
        "worker",
        _worker,
        help="run the stages placed on a work pool (run.placement) in this clone",
        description="Starts `prefect worker start --pool POOL --type process` against the "
        "Prefect server at PREFECT_API_URL, its flow runs in the clone at --root: stages "
        "that params.yaml's run.placement puts on POOL run here, each in its own work tree at "
        "the orchestrator's commit, with this clone's DVC cache and remote. README: \"Run "
        'stages on other machines".',
    )
    worker.add_argument("pool", help="the work pool's name (created if missing)")
    worker.add_argument("--root", type=Path, default=Path("."), help="this machine's clone")


DESCRIPTION = """\
graft: a reproducible image transfer-learning pipeline. Point it at folders of images: it \
verifies every file, splits them, pretrains a backbone, fine-tunes it for your classes, \
evaluates the result and packages the model with a model card.
DVC caches every stage (dvc.yaml) so that only what changed runs again; Prefect runs the stages \
as a flow; every published version can be audited back to its images."""

EPILOG = """\
the usual workflow, in the project root:
  graft demo                        # (re)write the built-in digits demo in data/demo
  graft check                       # params.yaml valid, source folders found
  dvc repro                         # run the pipeline, or: graft run (a Prefect flow run)
  graft publish                     # version the packaged model: <name>@vX.Y.Z, a git tag
  graft lineage show <name>@latest  # what produced it: images, params, code, weights
  graft predict <name>@latest DIR   # classify new images with it, each row naming the model

<name> is params.yaml's register.name (digits-5-9 for the demo); your own images: set \
ingest.sources in params.yaml. `graft <command> --help` tells each command's options."""


def _version() -> str:
    try:
        return version("graft")  # the installed distribution's metadata
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The ``graft`` command's argument parser, every subcommand included.

    Parsed arguments carry ``handler``, the function that runs the chosen subcommand with
    them. Raises nothing; parsing bad arguments exits with status 2, as argparse does.
    """
    parser = argparse.ArgumentParser(
        prog="graft", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--version", action="version", version=f"graft {_version()}", help="print the version"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = _command(
        commands, "check", _check, help="validate params.yaml without running anything"
    )
    check.add_argument(
        "--params", type=Path, default=DEFAULT_PARAMS, help="the params file to check"
    )

    verify = _command(
        commands,
        "verify",
        _verify,
        help="verify every image of a folder in ImageFolder layout (<folder>/<class>/<image>)",
        description=VERIFY_DESCRIPTION,
    )
    verify.add_argument("folder", type=Path, help="the folder: <folder>/<class>/<image>")
    verify.add_argument(
        "--json", action="store_true", help="print a JSON list of records instead of the table"
    )
    verify.add_argument(
        "--fail-on-rejected",
        action="store_true",
        help=f"exit with status {REJECTED_EXIT} when any file is rejected (for scripts)",
    )
    verify.add_argument(
        "--min-side",
        type=int,
        metavar="PIXELS",
        default=DEFAULT_MIN_SIDE,
        help="pixels: an image whose shorter side is below this is too_small",
    )
    verify.add_argument(
        "--max-pixels",
        type=int,
        metavar="PIXELS",
        default=DEFAULT_MAX_PIXELS,
        help="pixels, width x height: an image above this is too_large, refused before decoding",
    )
    verify.add_argument(
        "--decode-memory-mb",
        type=int,
        metavar="MIB",
        default=DEFAULT_DECODE_MEMORY_MB,
        help=f"MiB each decoding process may use (at least {MIN_DECODE_MEMORY_MB}); a file "
        "that needs more is too_large",
    )
    verify.add_argument(
        "--decode-timeout-s",
        type=float,
        metavar="SECONDS",
        default=DEFAULT_DECODE_TIMEOUT_S,
        help="seconds one file may take to decode; a file that takes longer gets timeout",
    )
    verify.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="decoding processes; 0: one per CPU core",
    )

    _add_flow_commands(commands)  # run, serve, worker

    demo = _command(commands, "demo", _demo, help="(re)write the built-in digits demo images")
    demo.add_argument(
        "--out", type=Path, default=Path("data/demo"), help="the folder to write them to"
    )

    add_registry_commands(commands)  # publish, lineage
    add_predict_command(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run ``graft`` with ``argv`` (default: the process's arguments) and return when done.

    Exits with status 1 and the message on stderr for a GraftError (an expected failure), 2
    for bad arguments, and 1 quietly when the output pipe closes early (``graft ... | head``).
    """
    arguments = build_parser().parse_args(argv)
    try:
        run_main(lambda: arguments.handler(arguments))
    except BrokenPipeError:  # output piped into `head` and friends: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
