"""The `lrulm` command line: parses flags, starts the distributed runtime, calls the library.

lrulm train    --config CONFIG.py[:ARG] --workdir DIR [--config.a.b=VALUE ...]
lrulm eval     --workdir DIR [--config CONFIG.py[:ARG]] [--step S | --best] [--config.a.b=VALUE ...]
lrulm generate --workdir DIR (--prompt TEXT ... and/or --prompt_file FILE) [--num_samples K]
               [--step S | --best] [--max_new_tokens N] [--temperature T] [--top_p P] [--top_k K]
               [--min_p P] [--repetition_penalty R] [--presence_penalty A]
               [--frequency_penalty F] [--seed S] [--batch_size B] [--output FILE.jsonl]
               [--stop TEXT ...] [--weights auto|ema|raw] [--stream]
lrulm config   --config CONFIG.py[:ARG] [--config.a.b=VALUE ...]
lrulm score    --workdir DIR (--text TEXT ... | --input FILE ...) [--step S | --best]
               [--weights auto|ema|raw] [--output FILE.jsonl]
               [--batch_size B] [--chunk TOKENS] [--text_field F]
lrulm lra-report DIR [DIR ...] [--plot FILE.png]
lrulm compile  --config CONFIG.py[:ARG] --topology v5p-128|h100:8 [--config.a.b=VALUE ...]
lrulm tokenizer train --input GLOB[,GLOB] --output FILE.model [--vocab_size V] [--text_field F]

Exit codes: 0 done; 1 `train` stopped because the loss or a gradient became non-finite (the
message names the step; the last good checkpoint is kept), or an error lrulm did not foresee
(a traceback; e.g. no coordinator reached); 2 a bad config, flag or input file, or checkpoints
that do not serve (none reads back: running the same command again then trains from step 0;
--best without a best checkpoint; a damaged --step), one line says which; 75 `train` stopped
for a preemption signal or Ctrl-C after saving (lrulm.preemption: run it again to resume);
130 a second Ctrl-C stopped it without saving.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import json
import logging
import os
import re
import signal
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrulm", description="Train deep LRU models with JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = sub.choices  # each command's parser: its usage in its errors

    overrides = (
        "Any key of the config can follow as --config.KEY=VALUE (e.g. --config.optim.lr=3e-4 "
        "--config.mesh.fsdp=4); a misspelt key fails at once, naming the closest one. The "
        "keys and their defaults: lrulm/config.py (base_config) and the config file."
    )
    for name, help_ in [("train", "train or resume"), ("eval", "evaluate a checkpoint")]:
        s = sub.add_parser(name, help=help_, epilog=overrides)
        if name == "eval":
            s.add_argument(
                "--config", help="CONFIG.py[:ARG]; default: the run's own (WORKDIR/config.json)"
            )
        else:
            s.add_argument("--config", required=True, help="CONFIG.py[:ARG]")
        s.add_argument("--workdir", required=True)
        if name == "eval":
            _checkpoint_arguments(s)

    g = sub.add_parser("generate", help="sample from a trained language model")
    g.add_argument("--workdir", required=True)
    g.add_argument(
        "--prompt", action="append", default=[], help="text to continue; repeat for more"
    )
    g.add_argument(
        "--prompt_file",
        default="",
        help='prompts, one per line (a .jsonl file: objects with a "prompt" or "text" field)',
    )
    g.add_argument(
        "--num_samples", type=int, default=1, help="continuations of each prompt (default: 1)"
    )
    _checkpoint_arguments(g)
    _weights_argument(g)
    g.add_argument("--max_new_tokens", type=int, default=200, help="default: 200")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    g.add_argument("--top_p", type=float, default=0.95, help="nucleus mass (default: 0.95)")
    g.add_argument("--top_k", type=int, default=0, help="0 = off (default: 0)")
    g.add_argument(
        "--min_p",
        type=float,
        default=0.0,
        help="drop tokens less likely than this times the likeliest (0 = off; e.g. 0.05)",
    )
    g.add_argument(
        "--repetition_penalty",
        type=float,
        default=1.0,
        help="divide the logits of tokens in the prompt or generated (1 = off; e.g. 1.2)",
    )
    g.add_argument(
        "--presence_penalty",
        type=float,
        default=0.0,
        help="subtract from the logit of each token generated (0 = off)",
    )
    g.add_argument(
        "--frequency_penalty",
        type=float,
        default=0.0,
        help="subtract from a token's logit per time it was generated (0 = off)",
    )
    g.add_argument("--seed", type=int, default=0, help="default: 0")
    g.add_argument(
        "--batch_size",
        type=int,
        default=32,
        help="samples decoded at once (each has its own key; default: 32)",
    )
    g.add_argument(
        "--output", default="", help="also write one JSON object per sample to this .jsonl"
    )
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        help="cut each completion where this text begins (repeatable; e.g. '\\n\\n')",
    )
    g.add_argument(
        "--stream",
        action="store_true",
        help="print the completion as it is decoded (one prompt, one sample)",
    )

    cf = sub.add_parser(
        "config", help="print a config with its overrides and the model it makes", epilog=overrides
    )
    cf.add_argument("--config", required=True, help="CONFIG.py[:ARG]")

    sc = sub.add_parser("score", help="a language model's log-likelihood of texts")
    sc.add_argument("--workdir", required=True)
    sc.add_argument("--text", action="append", default=[], help="a text to score; repeatable")
    sc.add_argument(
        "--input",
        action="extend",
        nargs="+",
        default=[],
        help="files of texts (globs, or the files a shell glob expands to): plain text (one "
        'text a file) or JSON lines with a "text" field (one a line); .gz too',
    )
    _text_field_argument(sc, default=None)
    _checkpoint_arguments(sc)
    _weights_argument(sc)
    sc.add_argument("--batch_size", type=int, default=8, help="texts at once (default: 8)")
    sc.add_argument(
        "--chunk", type=int, default=2048, help="tokens a text is read by (default: 2048)"
    )
    sc.add_argument("--output", default="", help="also write the results to this .jsonl")

    r = sub.add_parser("lra-report", help="LRA accuracy beside the paper's table")
    r.add_argument("workdirs", nargs="+")
    r.add_argument("--plot", default="", help="also write a bar chart to this PNG")

    c = sub.add_parser(
        "compile",
        help="compile the train step for a TPU topology or GPU host (AOT)",
        epilog=overrides,
    )
    c.add_argument("--config", required=True, help="CONFIG.py[:ARG]")
    c.add_argument("--topology", required=True, help="e.g. v5p-128, v5p:4x4x4, h100:8 or h100:8x4")
    c.add_argument("--json", default="", help="also write the report as JSON here")

    t = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    t.commands = tsub.choices
    tt = tsub.add_parser("train", help="train a sentencepiece tokenizer")
    tt.add_argument("--input", required=True, help="globs of text / JSON-lines files")
    tt.add_argument("--output", required=True)
    tt.add_argument("--vocab_size", type=int, default=32000, help="default: 32000")
    _text_field_argument(tt)
    return p


def _check_output(parser, path: str, flag: str = "--output") -> None:
    """--output (if given) can be written: checked before the work, not after it."""
    parent = os.path.dirname(os.path.abspath(path))
    if path and (os.path.isdir(path) or not os.access(parent, os.W_OK)):
        parser.error(f"{flag} {path}: give a file in an existing, writable directory")


def _unescape(text: str) -> str:
    """A flag's text with \\n, \\t and \\\\ read as a newline, a tab and a backslash (a
    shell passes them literally)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t"}.get(m[1], "\\"), text)


def _config(args, extra):
    from lrulm import config as config_lib

    overrides = config_lib.parse_overrides(extra)
    if args.config:
        path = args.config
    else:  # `lrulm eval` without --config: the run's own
        path = os.path.join(args.workdir, "config.json")
        if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
            raise FileNotFoundError(f"workdir {args.workdir} is a file, not a run's directory")
        if not os.path.isdir(args.workdir):
            raise FileNotFoundError(f"workdir {args.workdir} does not exist")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{args.workdir} has no config.json; give --config")
    config = config_lib.load(path)
    if path.lower().endswith(".json"):  # a run's record: its paths are relative to its start
        from lrulm import run_config

        started = run_config.started_in(os.path.dirname(path) or ".")
        if started and os.path.realpath(started) != os.path.realpath(os.getcwd()):
            run_config.rebase_paths(config, started)
    for key, value in overrides:  # the command line's own paths: relative to here
        config_lib.override(config, key, value)
    return config


def _checkpoint_arguments(parser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="the checkpoint (default: newest)")
    which.add_argument(
        "--best",
        action="store_true",
        help="the best-on-eval checkpoint the run keeps (LRA's, what lra-report reports; a "
        "language model's with checkpoint.keep_best)",
    )


def _weights_argument(parser) -> None:
    parser.add_argument(
        "--weights",
        choices=("auto", "ema", "raw"),
        default="auto",
        help="the weight average of optim.ema (ema) or the trained weights (raw); default "
        "auto: the average where the checkpoint keeps one",
    )


def _text_field_argument(parser, default: str | None = "text") -> None:
    parser.add_argument(
        "--text_field",
        default=default,
        help="the JSON lines' field that holds the text (default: "
        + ("text" if default else "the run's data.text_field")
        + "; e.g. content)",
    )


def main(argv: list[str]) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Errors from here on show the command's usage (`lrulm generate: error: ...`).
    parser = parser.commands[args.command]
    if args.command == "tokenizer":
        parser = parser.commands[args.tokenizer_command]
    if extra and args.command not in ("train", "eval", "compile", "config"):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    if getattr(args, "text_field", None) is not None and not args.text_field.strip():
        parser.error("--text_field names the JSON field that holds the text; it is empty")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # `kill -USR2 PID`: every thread's Python stack to stderr, and the command goes on (a
    # job that hangs, e.g. one process of a multi-host run waiting in a collective).
    # Not where stderr is no file (main() called in-process, under a test's capture).
    with contextlib.suppress(OSError, ValueError, AttributeError):
        faulthandler.register(signal.SIGUSR2, all_threads=True)
    from lrulm import config as config_lib
    from lrulm import preemption

    if args.command in ("eval", "generate", "score", "config"):  # their stdout is the result
        from lrulm import metrics as metrics_lib

        metrics_lib.messages_to_stderr()
    try:
        match args.command:
            case "train" | "eval":
                config = _config(args, extra)
                from lrulm import distributed, train

                distributed.initialize()
                if args.command == "train":
                    try:
                        train.train_and_evaluate(config, args.workdir, ctrl_c=True)
                    except preemption.Preempted as e:
                        print(f"lrulm train: {e} (exit {preemption.EXIT_CODE})", file=sys.stderr)
                        return preemption.EXIT_CODE
                    except train.NonFiniteLoss as e:  # the run diverged: not a usage error
                        if os.environ.get("LRULM_TRACEBACK"):
                            raise
                        print(f"lrulm train: error: {e}", file=sys.stderr)
                        return 1
                else:
                    from lrulm import evaluation

                    result = evaluation.evaluate_workdir(
                        config, args.workdir, args.step, best=args.best
                    )
                    print(json.dumps(result))
            case "generate":
                from lrulm import distributed, generate

                prompts = list(args.prompt)
                if args.prompt_file:
                    prompts += generate.read_prompts(args.prompt_file)
                if not prompts:
                    parser.error("give --prompt TEXT (repeatable) or --prompt_file FILE")
                if args.stream and len(prompts) * args.num_samples != 1:
                    parser.error("--stream shows one sample: give one prompt and --num_samples 1")
                _check_output(parser, args.output)  # before minutes of generating
                distributed.initialize()
                streamer = _Streamer(prompts[0]) if args.stream else None
                samples = generate.generate_texts(
                    args.workdir,
                    prompts,
                    num_samples=args.num_samples,
                    step=args.step,
                    best=args.best,
                    weights=args.weights,
                    batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    top_k=args.top_k,
                    min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty,
                    presence_penalty=args.presence_penalty,
                    frequency_penalty=args.frequency_penalty,
                    seed=args.seed,
                    stop=tuple(_unescape(t) for t in args.stop),
                    stream=streamer,
                )
                import jax

                if args.stream and jax.process_index() == 0:
                    streamer.finish()  # the text is out; the samples still go to --output
                    _print_samples(samples, args.output, text=False)
                elif jax.process_index() == 0:  # every process decoded the same samples
                    _print_samples(samples, args.output)
            case "config":
                from lrulm import config as config_lib
                from lrulm import experiment, tasks

                config = _config(args, extra)
                experiment.check_config(config)  # what train would refuse, but the devices
                tasks.best_metric(config)
                if note := tasks.vocab_note(config):
                    metrics_lib.say(note)  # stderr: stdout is the JSON
                task = tasks.make_task(config, None, prepare_data=False)
                model = dataclasses.asdict(task.model_config)
                out = {"config": config_lib.to_dict(config), "model": model}
                out["model"]["num_params"] = int(task.num_params())
                print(json.dumps(out, indent=2))
            case "score":
                from lrulm import distributed, generate, score
                from lrulm.data import documents
                from lrulm.data import lm as lm_data

                # Each text with where it is from: --text K, or FILE:LINE of a JSON line.
                named = [(f"--text {k}", t) for k, t in enumerate(args.text, 1)]
                field = args.text_field
                if field is None and args.input:  # the field the run read its data from
                    field = documents.TEXT_FIELD
                    with contextlib.suppress(FileNotFoundError):
                        run = generate.run_config(args.workdir)
                        field = run.data.get("text_field", documents.TEXT_FIELD)
                for pattern in args.input:
                    for path in lm_data.expand_globs(pattern, "--input"):
                        records = documents.read_records(path, field)
                        named += [(f"{path}:{n}", t) for n, t in records]
                if not named:
                    parser.error("give --text TEXT (repeatable) or --input FILE")
                skipped = [src for src, t in named if not t]
                if skipped:
                    print(
                        f"lrulm score: skipping {len(skipped)} empty texts ({skipped[0]}"
                        + (", ..." if len(skipped) > 1 else "")
                        + ")",
                        file=sys.stderr,
                    )
                named = [(src, t) for src, t in named if t]
                if not named:
                    parser.error("every text given is empty")
                sources, texts = [src for src, _ in named], [t for _, t in named]
                _check_output(parser, args.output)
                distributed.initialize()
                results = score.score_texts(
                    args.workdir, texts, step=args.step, best=args.best,
                    batch_size=args.batch_size, chunk=args.chunk, weights=args.weights,
                )  # fmt: skip
                import jax

                if jax.process_index() == 0:  # every process scored the same texts
                    rows = [{"source": s, **r} for s, r in zip(sources, results)]
                    print("\n".join(json.dumps(r) for r in rows))
                    if args.output:
                        _write_jsonl(args.output, rows)
                    total = score.summary(results)
                    print(
                        f"lrulm score: {total['texts']} texts, {total['tokens']} tokens: loss "
                        f"{total['loss']:.4f} a token, {total['bits_per_byte']:.4f} bits a byte",
                        file=sys.stderr,
                    )
            case "lra-report":
                from lrulm import lra_report

                print(lra_report.report(args.workdirs, plot=args.plot or None))
            case "compile":
                from lrulm import compile as compile_lib

                _check_output(parser, args.json, "--json")  # before minutes of compiling
                config = _config(args, extra)
                return compile_lib.main(config, args.topology, json_path=args.json or None)
            case "tokenizer":
                from lrulm.data import documents
                from lrulm.data import lm as lm_data
                from lrulm.data import tokenizer as tok

                files = lm_data.expand_globs(args.input, "--input")
                docs = (d for f in files for d in documents.read_documents(f, args.text_field))
                sp = tok.train_tokenizer(docs, args.output, vocab_size=args.vocab_size)
                short = sp.get_piece_size() < args.vocab_size
                print(
                    f"wrote {args.output}: {sp.get_piece_size()} pieces"
                    + (
                        f", fewer than the {args.vocab_size} asked for: the text holds no more"
                        * short
                    )
                )
    except KeyboardInterrupt:  # a second Ctrl-C: the first asks train to save and stop
        print(f"lrulm {args.command}: interrupted", file=sys.stderr)
        if _multi_process():  # not into jax's shutdown barrier: peers may be mid-collective
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    except preemption.SignalBeforeStart:  # while waiting for the other processes
        print(
            f"lrulm {args.command}: a preemption signal came before the run started; "
            f"nothing to save (exit {preemption.EXIT_CODE})",
            file=sys.stderr,
        )
        return preemption.EXIT_CODE
    except (config_lib.ConfigError, ValueError, FileNotFoundError) as e:
        if os.environ.get("LRULM_TRACEBACK"):
            raise
        print(f"lrulm {args.command}: error: {e}", file=sys.stderr)
        if _multi_process():
            # A normal exit would wait in jax's shutdown barrier for peers that are
            # blocked in a collective; leave at once and let the launcher stop them.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    return 0


class _Streamer:
    """`--stream`'s printer on process 0: the prompt with the first piece (not before the
    model has loaded and decodes), then each new piece as it comes."""

    def __init__(self, prompt: str):
        import jax

        self.prompt, self.started = prompt, False
        self.quiet = jax.process_index() != 0  # every process decodes; process 0 prints

    def __call__(self, piece: str) -> None:
        if self.quiet:
            return
        if not self.started:
            print(self.prompt, end="")
            self.started = True
        print(piece, end="", flush=True)

    def finish(self) -> None:
        if self.quiet:
            return
        if not self.started:  # an empty completion: the prompt alone
            print(self.prompt, end="")
        print()


def _print_samples(samples: list[dict], output: str, text: bool = True) -> None:
    """One sample: its text alone (prompt and continuation); more: each under a header
    (text=False: none, when they were streamed)."""
    for sample in samples if text else ():
        if len(samples) > 1:
            print(f"=== prompt {sample['prompt_index'] + 1}, sample {sample['sample'] + 1} ===")
        print(sample["prompt"] + sample["completion"])
    if output:
        _write_jsonl(output, samples)
        print(f"wrote {len(samples)} samples to {output}", file=sys.stderr)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    """One JSON object a line, written whole or not at all."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(path + ".tmp", path)


def _multi_process() -> bool:
    try:
        import jax

        return jax.distributed.is_initialized() and jax.process_count() > 1
    except Exception:  # noqa: BLE001 - jax not importable is not multi-process
        return False


def exit_quietly_on_broken_pipe(fn) -> int:
    """fn()'s exit code; 141 (as for a tool SIGPIPE killed), without a traceback, when
    the reader of its stdout went away (`lrulm config ... | head`)."""
    try:
        code = fn()
        sys.stdout.flush()  # inside: what is still buffered may hit the closed pipe
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing at exit
        return 141


def run() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(exit_quietly_on_broken_pipe(lambda: main(sys.argv[1:])))
