"""`languini sample --run_dir DIR|--bundle DIR --prompt TEXT`: continue a prompt with a trained run (or a
shared bundle), streaming the text.

Works for every project through the project contract: the run's `config.json` names its project, whose
spec loads the config and builds the model; the weights come from the run's checkpoint, or from a bundle's
`model.safetensors` after the bundle is verified (its own tokenizer.model is used). The prompt is
encoded with the dataset's SentencePiece model after an end-of-document token `<D>` (a book starts after
`<D>` in the training streams), and each new token is decoded and printed as it arrives.

- Stateless models (eval protocol `sliding_window`, e.g. GPT) see a window of the last `seq_len` tokens,
  recomputed for every new token (the model exposes no key/value cache; its code stays unchanged).
- Stateful models (`stateful`, e.g. the LSTMs) read the prompt once, in chunks of `seq_len`, then carry
  their state from token to token.

Sampling: logits / temperature, the `top_k` most likely tokens (0: all), one draw from a CPU generator
seeded with `--seed`, so the same seed on the same device gives the same text; `--temperature 0` is greedy.
"""

import json
import os
import sys

import torch

from languini.common_lib.device import autocast_context, configure_device, resolve_device, resolve_precision
from languini.common_lib.errors import OneLineArgumentParser, UserError, exit_on_user_error
from languini.dataset_lib.layout import END_OF_DOC
from languini.dataset_lib.tokenizer_model import load_processor
from languini.projects import load_project
from languini.tools.export import check_bundle
from languini.train_lib import bundle
from languini.train_lib.checkpoint import load_model_state, load_model_weights
from languini.train_lib.run_folder import CHECKPOINT_NAME


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="languini sample", description="Continue a prompt with a trained run, "
                                   "printing the text as it is generated.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run_dir", help="the run folder (config.json, checkpoints/latest.pt)")
    source.add_argument("--bundle", help="a bundle written by `languini export` (verified before use)")
    parser.add_argument("--prompt", required=True, help="the text to continue (may be empty)")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default 1)")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens; 0: all (default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    parser.add_argument("--checkpoint", help="a checkpoint instead of RUN_DIR/checkpoints/latest.pt")
    parser.add_argument("--tokenizer", help="a SentencePiece model instead of the run's <data_root>/<dataset>/tokenizer.model")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (default: cuda when available)")
    return parser


def run_project(config_path: str) -> str:
    """The project that trained a run, from its config.json's `project` field."""
    try:
        with open(config_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"no config at {config_path}; is --run_dir a run folder?") from None
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {config_path}: {str(e).splitlines()[0]}") from None
    project = data.get("project") if isinstance(data, dict) else None
    if not isinstance(project, str) or not project:
        raise UserError(f"{config_path} names no project (its `project` field is empty); it predates project folders")
    return project


def pick_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """One token from the last position's logits (1-D): argmax when temperature is 0, else a seeded draw."""
    logits = logits.detach().float().cpu()
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@torch.no_grad()
def generate(model, stateful: bool, prompt_ids: list[int], max_new_tokens: int, seq_len: int, pick,
             on_token=None) -> list[int]:
    """The `max_new_tokens` tokens that follow `prompt_ids` (at least one id); `pick(logits)` chooses each
    one from the last position's logits and `on_token(id)` sees it at once."""
    device = next(model.parameters()).device
    new = []

    def emit(token: int):
        new.append(token)
        if on_token is not None:
            on_token(token)

    if stateful:
        state = model.get_init_state(1, device)
        for start in range(0, len(prompt_ids), seq_len):
            chunk = torch.tensor([prompt_ids[start : start + seq_len]], dtype=torch.long, device=device)
            logits, state = model(chunk, state)
        for i in range(max_new_tokens):
            emit(pick(logits[0, -1]))
            if i + 1 < max_new_tokens:
                logits, state = model(torch.tensor([[new[-1]]], dtype=torch.long, device=device), state)
    else:
        context = list(prompt_ids)
        for _ in range(max_new_tokens):
            window = torch.tensor([context[-seq_len:]], dtype=torch.long, device=device)
            logits, _ = model(window, model.get_init_state(1, device))
            emit(pick(logits[0, -1]))
            context.append(new[-1])
    return new


class TextStream:
    """Prints the decoded text of the tokens so far as they arrive, holding back an incomplete UTF-8
    character (byte-fallback pieces decode to U+FFFD until the character is whole)."""

    def __init__(self, sp, out):
        self.sp, self.out, self.ids, self.shown = sp, out, [], ""

    def _show(self, text: str):
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text

    def add(self, token: int):
        self.ids.append(token)
        self._show(self.sp.decode(self.ids).rstrip("\ufffd"))

    def finish(self) -> str:
        self._show(self.sp.decode(self.ids))
        return self.sp.decode(self.ids)


def _check_options(args):
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1 (got {args.max_new_tokens})")
    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise UserError(f"--temperature must be a finite number >= 0 (got {args.temperature})")
    if args.top_k < 0:
        raise UserError(f"--top_k must be 0 (all tokens) or more (got {args.top_k})")
    if args.run_dir and not os.path.isdir(args.run_dir):
        raise UserError(f"no run folder at {args.run_dir}")
    if args.bundle and not os.path.isdir(args.bundle):
        raise UserError(f"no bundle folder at {args.bundle} (--bundle is a folder written by `languini export`)")
    if args.bundle and args.checkpoint:
        raise UserError("--checkpoint applies to --run_dir; a bundle holds its own weights")


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    _check_options(args)
    if args.bundle:
        check_bundle(args.bundle)  # before anything of it is read
    config_path = os.path.join(args.run_dir or args.bundle, "config.json")
    spec = load_project(run_project(config_path))
    cfg = spec.load_run_config(config_path)
    if args.bundle:
        weights = bundle.read_weights(args.bundle)
        checkpoint, default_tokenizer = args.bundle, os.path.join(args.bundle, "tokenizer.model")
    else:
        checkpoint = args.checkpoint or os.path.join(args.run_dir, "checkpoints", CHECKPOINT_NAME)
        if not os.path.isfile(checkpoint):
            raise UserError(f"no checkpoint at {checkpoint}; train the run first or pass --checkpoint PATH")
        default_tokenizer = os.path.join(cfg.data_root, cfg.dataset, "tokenizer.model")
    tokenizer = args.tokenizer or default_tokenizer
    if not os.path.isfile(tokenizer):
        raise UserError(f"no tokenizer at {tokenizer}; pass --tokenizer PATH (the model the run's data was made with)")
    sp = load_processor(tokenizer)
    if sp.get_piece_size() != cfg.vocab_size:
        raise UserError(f"{tokenizer} has {sp.get_piece_size()} tokens but the run has vocab_size {cfg.vocab_size}; "
                        f"pass the run's tokenizer with --tokenizer")

    device = resolve_device(args.device)
    configure_device(device)
    model = spec.Model(cfg)
    if args.bundle:
        load_model_state(model, weights, args.bundle)
        step = "final"
    else:
        step = load_model_weights(model, checkpoint).get("step")
    model = model.to(device).eval()
    stateful = spec.eval_protocol == "stateful"
    print(f"sampling {args.max_new_tokens} tokens from {checkpoint} (project {spec.name}, step {step}) on {device}: "
          f"temperature {args.temperature:g}, top_k {args.top_k}, seed {args.seed}", file=sys.stderr)

    generator = torch.Generator().manual_seed(args.seed)
    stream = TextStream(sp, sys.stdout)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    with autocast_context(resolve_precision("auto", device), device):
        generate(model, stateful, [END_OF_DOC, *sp.encode(args.prompt)], args.max_new_tokens, cfg.seq_len,
                 lambda logits: pick_token(logits, args.temperature, args.top_k, generator), stream.add)
    stream.finish()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
