"""`languini export --run_dir R --out DIR [--archive]` and `languini verify-bundle DIR|ARCHIVE`.

Export packs a trained run into a bundle (train_lib/bundle.py): the weights as `model.safetensors`, the
run's records, the corpus identity and tokenizer, a generated README with results and the commands that
reproduce them, and a SHA-256 manifest. The checkpoint is read with safe loading, so a checkpoint carrying
a pickled object is refused, never executed. Verify checks a bundle (or its `.tar.gz`) before anyone
trusts it. See docs/sharing.md.
"""

import contextlib
import json
import os
import shutil
import sys
import tarfile
import tempfile

import torch

from languini.common_lib.atomic_io import atomic_open, atomic_write_text, current_umask
from languini.common_lib.errors import OneLineArgumentParser, UserError, exit_on_user_error
from languini.dataset_lib.layout import corpus_identity
from languini.projects import load_project
from languini.tools.flops import count_step_flops, param_counts
from languini.train_lib import bundle
from languini.train_lib.checkpoint import load_model_weights
from languini.train_lib.run_folder import CHECKPOINT_NAME, read_corpus

RECORDS = ("config.json", "metrics.jsonl", "env.json", "command.txt", "source.zip", bundle.CORPUS)


def meta_model(config: dict) -> torch.nn.Module:
    """The model of the project a config dict names, built on the meta device (nothing allocated)."""
    spec = load_project(config["project"])
    with torch.device("meta"):
        return spec.Model(spec.config_from_dict(config))


def _corpus(run_dir: str, cfg) -> dict | None:
    """The corpus identity the run recorded (a damaged corpus.json is refused in one line naming it), else
    that of its dataset as it is now, else None."""
    recorded = read_corpus(run_dir)
    if recorded is not None:
        return recorded
    dataset = os.path.join(cfg.data_root, cfg.dataset)
    with contextlib.suppress(UserError, OSError):
        return corpus_identity(dataset)
    return None


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def readme_text(name: str, config: dict, cfg, step: int, params: int, evals: dict, corpus: dict | None,
                command: str, flops_per_token: float | None) -> str:  # fmt: skip
    """The bundle's README: what it is, its results, how to reproduce and verify them."""
    project, tokens = config["project"], step * cfg.train_batch_size * cfg.seq_len
    budget = [f"- steps: {step:,} of {cfg.max_train_steps:,} (batch {cfg.train_batch_size} x {cfg.seq_len} tokens)",
              f"- tokens: {tokens:,}"]  # fmt: skip
    if cfg.tokens_per_second:
        hours = tokens / cfg.tokens_per_second / 3600
        budget.append(f"- compute: {hours:.4g} reference-GPU (RTX 3090) hours at {cfg.tokens_per_second:,.0f} tokens/s")
    if flops_per_token:
        budget.append(f"- training FLOPs: {flops_per_token * tokens:.4g} ({flops_per_token:.4g} per token, fwd+bwd)")
    lines = [
        f"# {name}", "",
        f"A trained `{project}` model ({cfg.preset or 'custom'} preset) exported by `languini export`.", "",
        "## Model", "",
        f"- project: `{project}`; preset: `{cfg.preset or 'custom'}`; parameters: {params:,}",
        f"- data: `{cfg.data_root}/{cfg.dataset}` (vocabulary {cfg.vocab_size})",
        f"- corpus identity: {json.dumps(corpus) if corpus else 'not recorded'}",
        *budget, "",
        "## Results", "",
    ]  # fmt: skip
    if evals:
        lines += ["| split | tokens | normalised ppl | ppl | bits per byte | protocol |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
        for data in evals.values():
            lines.append(
                f"| {data.get('split')} | {_fmt(data.get('n_tokens'), ',')} | {_fmt(data.get('normalised_ppl'), '.4f')} "
                f"| {_fmt(data.get('ppl'), '.2f')} | {_fmt(data.get('bits_per_byte'), '.4f')} | {data.get('protocol')} |"
            )
    else:
        lines.append("**No final evaluation was run for this model**: the bundle holds no `eval/` results. "
                     "Evaluate it with the command below before quoting numbers.")  # fmt: skip
    lines += [
        "", "## Reproduce", "",
        "Training (the command that produced this run, from a Languini checkout with the same data):", "",
        "```", command.strip() or "(no command.txt was recorded)", "```", "",
        "Evaluation of this bundle on every test split of its corpus:", "",
        "```", f"python3 languini/projects/{project}/eval.py --bundle {name} --eval_data_split all", "```", "",
        "## Verify", "",
        "```", f"languini verify-bundle {name}", "```", "",
        f"checks every file against `{bundle.MANIFEST}`, that nothing else is present, and that the weights fit "
        f"the `{project}` model the config describes. `{bundle.WEIGHTS}` holds weights only (safetensors: "
        "loading it runs no code).", "",
    ]  # fmt: skip
    return "\n".join(lines)


def _move_into_place(work: str, out: str):
    """Move the assembled bundle in `work` into the new folder `out`, its manifest last. `out` is created
    exclusively, so a folder that appeared there meanwhile is refused, never replaced (renaming `work` over
    it would silently replace an empty one); it gets the usual permissions (0o777 less the umask)."""
    try:
        os.mkdir(out)
    except FileExistsError:
        raise UserError(f"{out} appeared while the bundle was assembled; it was left as it is") from None
    try:
        for name in sorted(os.listdir(work), key=lambda name: name == bundle.MANIFEST):
            os.rename(os.path.join(work, name), os.path.join(out, name))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def export_run(run_dir: str, out: str, archive: bool = False) -> str:
    """Write the bundle of `run_dir` to the new folder `out` (assembled aside, then moved into place)."""
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise UserError(f"no run at {run_dir} (no config.json)")
    for path in [out] + ([archive_path(out)] if archive else []):
        if os.path.lexists(path):
            raise UserError(f"{path} already exists; choose a new --out (nothing was overwritten)")
    config = bundle.read_config_dict(run_dir)
    spec = load_project(config["project"])
    cfg = spec.load_run_config(os.path.join(run_dir, "config.json"))
    model = spec.Model(cfg)  # the checkpoint's weights (plain or sharded) must fit it: one line if not
    checkpoint = load_model_weights(model, os.path.join(run_dir, "checkpoints", CHECKPOINT_NAME))
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        from safetensors.torch import save_file

        save_file(weights, os.path.join(work, bundle.WEIGHTS), metadata={"project": spec.name})
        os.chmod(os.path.join(work, bundle.WEIGHTS), 0o666 & ~current_umask())  # safetensors writes 0600
        for name in RECORDS:
            src = os.path.join(run_dir, name)
            if os.path.isfile(src) and not os.path.islink(src):
                shutil.copyfile(src, os.path.join(work, name))
        evals = bundle.read_eval_results(run_dir)
        for split in evals:
            os.makedirs(os.path.join(work, "eval"), exist_ok=True)
            shutil.copyfile(os.path.join(run_dir, "eval", f"{split}.json"), os.path.join(work, "eval", f"{split}.json"))
        corpus = _corpus(run_dir, cfg)
        if corpus and not os.path.exists(os.path.join(work, bundle.CORPUS)):
            atomic_write_text(os.path.join(work, bundle.CORPUS), json.dumps(corpus, indent=2) + "\n")
        tokenizer = os.path.join(cfg.data_root, cfg.dataset, "tokenizer.model")
        if os.path.isfile(tokenizer):
            shutil.copyfile(tokenizer, os.path.join(work, "tokenizer.model"))
        command_path = os.path.join(run_dir, "command.txt")
        command = open(command_path).read() if os.path.isfile(command_path) else ""
        try:
            flops = count_step_flops(spec.name, cfg).forward_backward_per_token
        except Exception:  # counting is informative only: a model the counter cannot run still exports
            flops = None
        readme = readme_text(
            os.path.basename(os.path.normpath(out)), config, cfg, int(checkpoint.get("step", 0)),
            param_counts(model, cfg.vocab_size)[0], evals, corpus, command, flops,
        )  # fmt: skip
        atomic_write_text(os.path.join(work, "README.md"), readme)
        atomic_write_text(os.path.join(work, bundle.MANIFEST), bundle.manifest_text(work))
        _move_into_place(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if archive:
        write_archive(out, archive_path(out))
    return out


def archive_path(out: str) -> str:
    """Where `--archive` writes the bundle folder `out` as one file: OUT.tar.gz."""
    return out.rstrip("/") + ".tar.gz"


def write_archive(folder: str, target: str):
    """Write `folder` as the new file `target` (.tar.gz), never replacing a file already there.

    The archive is written completely in a private temporary folder beside `target`, then hard-linked into
    place: a crash leaves no half-written archive, and a file created at `target` meanwhile makes the link
    fail instead of being overwritten."""
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=os.path.dirname(os.path.abspath(target)))
    try:
        staged = os.path.join(staging, os.path.basename(target))
        with atomic_open(staged) as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
            tar.add(folder, arcname=os.path.basename(os.path.normpath(folder)))
        os.link(staged, target)
    except FileExistsError:
        raise UserError(f"{target} appeared while the archive was written; it was left as it is") from None
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_archive(path: str, into: str) -> str:
    """Extract a bundle archive (plain files and folders only, all inside `into`); returns the bundle folder."""
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir()) or os.path.isabs(m.name) or ".." in m.name.split("/"):
                    raise UserError(f"{path} holds '{m.name}', which a bundle archive never does")
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"cannot read {path} as a bundle archive: {e}") from None
    tops = {m.name.split("/")[0] for m in members}
    if len(tops) != 1:
        raise UserError(f"{path} must hold exactly one bundle folder, found {len(tops)} top-level entries")
    return os.path.join(into, tops.pop())


@contextlib.contextmanager
def opened_bundle(path: str):
    """The bundle folder of `path` (a folder, or a .tar.gz extracted to a temporary folder)."""
    if os.path.isfile(path):
        with tempfile.TemporaryDirectory() as tmp:
            yield _extract_archive(path, tmp)
    else:
        yield path


def _verify_build(config: dict):
    try:
        return meta_model(config)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"the config of the bundle does not build its model: {e}") from None


def check_bundle(folder: str):
    """Refuse the bundle in `folder` in one line naming it when it fails verification (any project's)."""
    bundle.check_bundle(folder, _verify_build)


@exit_on_user_error
def export_main(argv=None):
    parser = OneLineArgumentParser(prog="languini export",
                                   description="Pack a trained run into a verifiable bundle for sharing.")
    parser.add_argument("--run_dir", required=True, help="the run folder (config.json, checkpoints/latest.pt)")
    parser.add_argument("--out", required=True, help="the bundle folder to create (must not exist)")
    parser.add_argument("--archive", action="store_true", help="also write OUT.tar.gz")
    args = parser.parse_args(argv)
    out = export_run(args.run_dir, args.out, args.archive)
    evals = bundle.read_eval_results(out)
    print(f"wrote bundle {out}" + (f" and {archive_path(out)}" if args.archive else ""))
    if not evals:
        print("note: the run has no final evaluation (eval/ is empty); its README says so", file=sys.stderr)
    print(f"check it with: languini verify-bundle {out}")
    return 0


@exit_on_user_error
def verify_main(argv=None):
    parser = OneLineArgumentParser(prog="languini verify-bundle",
                                   description="Check a bundle's hashes, contents and weights.")
    parser.add_argument("bundle", help="a bundle folder or its .tar.gz")
    args = parser.parse_args(argv)
    if not os.path.exists(args.bundle):
        raise UserError(f"no bundle at {args.bundle}")
    with opened_bundle(args.bundle) as folder:
        problems = bundle.verify_bundle(folder, _verify_build)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        print(f"{args.bundle}: {len(problems)} problem(s); do not trust it", file=sys.stderr)
        return 1
    print(f"{args.bundle}: OK (every file matches {bundle.MANIFEST}; the weights fit the model)")
    return 0
