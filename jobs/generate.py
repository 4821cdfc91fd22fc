"""`sparkloom generate`: sample text from a trained GPT-2.

  sparkloom generate --model runs:/RUN_ID/model-files --prompt "The match" [--prompt ...]
  sparkloom generate --model data/text_classification/gpt2_model \\
      --input prompts.parquet --output completions/ [--prompt-column prompt --id-column id]

--model takes a model directory, an MLflow artifact URI (runs:/RUN_ID/model-files), a run id,
or a training checkpoint .pt with --tokenizer. With --prompt the completions are printed;
with --input/--output Spark generates over the whole file (Parquet, CSV with a header, JSON
lines, or .txt with one prompt per line) and writes Parquet, blank prompts to quarantine.
"""

from __future__ import annotations

import argparse

from sparkloom.jobs.runtime import Session


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory, runs:/... URI, run id or .pt")
    p.add_argument("--tokenizer", help="tokenizer.json, for a checkpoint .pt")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store for runs:/ URIs (default: --conf's, else sqlite:///mlflow.db)")  # fmt: skip
    p.add_argument("--conf", action="append", default=[], metavar="FILE",
                   help="pipeline YAML: its Spark and MLflow settings (and gpt2.generate defaults)")  # fmt: skip
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for more")
    p.add_argument("--input", help="prompts file for batch generation with Spark")
    p.add_argument("--output", help="output Parquet directory (with --input)")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--id-column", default=None, help="row key (default: the prompt's hash)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.input) != bool(args.output):
        p.error("--input and --output go together")
    if not args.prompt and not args.input:
        p.error("give --prompt TEXT (repeatable) or --input FILE --output DIR")


def _sampling(args: argparse.Namespace, cfg):
    from sparkloom.pipelines.generation import Sampling

    g = cfg.gpt2.generate if cfg is not None else None
    defaults = Sampling() if g is None else Sampling(
        g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.seed
    )  # fmt: skip
    given = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
             "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}  # fmt: skip
    s = Sampling(**{**vars(defaults), **{k: v for k, v in given.items() if v is not None}})
    if s.max_new_tokens < 1 or s.temperature < 0 or s.top_k < 0 or not 0 < s.top_p <= 1:
        from sparkloom.pipelines.errors import ConfigError

        raise ConfigError(
            f"bad sampling settings {vars(s)}: max_new_tokens >= 1, temperature >= 0, "
            "top_k >= 0, 0 < top_p <= 1"
        )
    return s


def main(args: argparse.Namespace, session: Session) -> int:
    cfg = None
    if args.conf:
        from sparkloom.pipelines.config import load_config

        cfg = load_config(args.conf)
    from sparkloom.pipelines.generation import complete, resolve_model, write_generations

    s = _sampling(args, cfg)
    tracking = args.tracking_uri or (cfg.mlflow.tracking_uri if cfg else "sqlite:///mlflow.db")
    model_dir = resolve_model(args.model, tracking, args.tokenizer)
    if args.prompt:
        texts, lengths = complete(model_dir, args.prompt, s)
        for prompt, text, n in zip(args.prompt, texts, lengths, strict=True):
            print(f"--- {prompt!r} (+{n} tokens)\n{prompt}{text}\n")
    if args.input:
        from sparkloom.pipelines.config import SparkConfig
        from sparkloom.pipelines.spark import read_table

        spark = session.spark(cfg.spark if cfg else SparkConfig())
        df = read_table(spark, args.input, args.prompt_column)
        r = write_generations(df, model_dir, s, args.output, args.prompt_column, args.id_column)
        print(f"generated {r.rows_out} completions -> {r.output}; {r.quarantined} prompts "
              f"quarantined (blank) -> {r.output}_quarantine; {r.rows_in} in")  # fmt: skip
    return 0
