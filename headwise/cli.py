"""The `headwise` command line (also `python -m headwise`, so `accelerate launch -m headwise ...` works).

    headwise train RECIPE [key.sub=value ...]      train (resumes from the last checkpoint)
    headwise export RUN_DIR [method.x=value ...]   adapter/merged folder + model card + inference config
    headwise push PATH --repo-id owner/name        upload an export to the Hugging Face Hub
    headwise generate PATH "prompt"                generate with an export (or any model)
    headwise recipe show|validate|list|fields      inspect recipes

Errors in user input print one message naming the field or file and the fix, and exit with 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from headwise.version import __version__


def _user_errors() -> tuple[type[BaseException], ...]:
    # lazy: the wing pulls in torch, and `headwise --help` stays fast
    from headwise.data_builders import DataError
    from headwise.errors import HeadwiseError

    return (HeadwiseError, DataError, FileNotFoundError)


def _cmd_train(args) -> int:
    # lazy: the wing pulls in torch, and `headwise --help` stays fast
    from headwise.recipe.loader import load_recipe
    from headwise.train.run_dir import is_main_process
    from headwise.train.trainer import release_process_group, train

    loaded = load_recipe(args.recipe, args.overrides)
    if is_main_process():
        print(f"headwise: training {args.recipe} -> {loaded.recipe.training.output_dir}", file=sys.stderr)
    final = train(loaded).final_dir
    release_process_group()
    if is_main_process():
        print(f"headwise: done; weights in {final}. Next: headwise export {loaded.recipe.training.output_dir}")
    return 0


def _cmd_export(args) -> int:
    # lazy: the wing pulls in torch, and `headwise --help` stays fast
    from headwise.publish.export import export_run

    out = export_run(args.run_dir, out_dir=args.out, format=args.format, checkpoint=args.checkpoint,
                     overwrite=args.overwrite, overrides=args.overrides)
    print(f"headwise: exported to {out}")
    return 0


def _cmd_push(args) -> int:
    # lazy: the wing pulls in torch, and `headwise --help` stays fast
    from headwise.publish.hub import plan_push, push

    plan = plan_push(args.path, args.repo_id, args.private)
    print(f"headwise: {len(plan.files)} files from {plan.folder} -> {plan.repo_id} ({'private' if plan.private else 'public'})")
    for f in plan.files:
        print(f"  {f}")
    if args.dry_run:
        print("headwise: dry run, nothing uploaded")
        return 0
    # lazy: the wing pulls in torch, and `headwise --help` stays fast
    from headwise.publish.hub import HubRetryPolicy

    url = push(plan, policy=HubRetryPolicy.resolve(args.timeout, args.retries))
    print(f"headwise: pushed {url}")
    return 0


def _cmd_generate(args) -> int:
    # lazy: the wing pulls in torch, and `headwise --help` stays fast
    from headwise.inference.config import parse_kv_policy
    from headwise.inference.load import load

    policy = parse_kv_policy(args.policy, field="--policy") if args.policy is not None else None
    loaded = load(args.path, dtype=args.dtype, policy=policy, attn_implementation=args.attn_implementation)
    print(loaded.generate(args.prompt, max_new_tokens=args.max_new_tokens, static=args.static, compile=args.compile))
    return 0


def _cmd_recipe(args) -> int:
  
    # lazy: the wing pulls in torch, and `headwise --help` stays fast
    from headwise.recipe.loader import RecipeError, list_shipped_recipes, load_recipe

    if args.action == "list":
        for name in list_shipped_recipes():
            print(name)
        return 0
    if args.action == "fields":
      
        # lazy: the wing pulls in torch, and `headwise --help` stays fast
        from headwise.recipe.reference import render_recipe_reference

        print(render_recipe_reference())
        return 0
    if args.action == "show":
        if len(args.recipes) != 1:
            raise RecipeError("recipe show takes one recipe (then optional key=value overrides)")
        print(load_recipe(args.recipes[0], args.overrides).resolved_yaml(), end="")
        return 0
    if not args.recipes:
        given = f" (only overrides were given: {' '.join(args.overrides)})" if args.overrides else ""
        raise RecipeError(f"recipe validate: no recipe file given{given}; usage: headwise recipe validate RECIPE "
                          "[RECIPE ...] [key=value ...]")
    failed = 0
    for r in args.recipes:  # every file gets its verdict, whatever stopped the one before
        try:
            load_recipe(r, args.overrides)
            print(f"ok      {r}")
        except _user_errors() as e:
            failed += 1
            print(f"invalid {e}")
    return 2 if failed else 0


def _prompt_arg(text: str) -> str:
    """argparse type of a prompt: some text to continue (an empty prompt would fail inside the model)."""
    if not text.strip():
        kind = "empty" if not text else "whitespace-only"
        raise argparse.ArgumentTypeError(f"{kind} prompt: give text for the model to continue")
    return text


def _positive_int_arg(text: str) -> int:
    """argparse type of a token count: a whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, 1 or more")
    return value


def _hub_timeout_arg(text: str) -> float:
    """argparse type of push --timeout: seconds per Hub network operation, in HubRetryPolicy's range."""
  
    # lazy: the wing pulls in torch, and `headwise --help` stays fast
    from headwise.publish.hub import TIMEOUT_RANGE, PushError, check_timeout

    try:
        return check_timeout("--timeout", float(text))
    except (ValueError, PushError):
        raise argparse.ArgumentTypeError(f"{text!r}: {TIMEOUT_RANGE}") from None


def _hub_retries_arg(text: str) -> int:
    """argparse type of push --retries: further tries of a failed Hub call, in HubRetryPolicy's range."""
  
    # lazy: the wing pulls in torch, and `headwise --help` stays fast
    from headwise.publish.hub import RETRIES_RANGE, PushError, check_retries

    try:
        return check_retries("--retries", int(text))
    except (ValueError, PushError):
        raise argparse.ArgumentTypeError(f"{text!r}: {RETRIES_RANGE}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headwise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command")

    t = sub.add_parser("train", help="train a recipe (resumes from the last checkpoint in its output_dir)")
    t.add_argument("recipe", help="recipe file or shipped recipe name (see `headwise recipe list`)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides (beat the file); ~key removes a key")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("export", help="write the adapter or merged model, inference config and model card")
    e.add_argument("run_dir")
    e.add_argument("overrides", nargs="*", help="method.key=value / export.key=value changes for this export only "
                   "(e.g. method.streaming_fraction=0.75 for a DuoAttention run)")
    e.add_argument("--out", help="export folder (default: export.dir of the recipe, else RUN_DIR/export)")
    e.add_argument("--format", choices=["adapter", "merged"], help="override export.format")
    e.add_argument("--checkpoint", help="export checkpoint-N instead of the final weights")
    e.add_argument("--overwrite", action="store_true", help="replace a previous headwise export (only a folder that holds nothing else)")
    e.set_defaults(func=_cmd_export)

    pu = sub.add_parser("push", help="upload an export folder to the Hugging Face Hub")
    pu.add_argument("path", help="export folder, or a run directory with an export")
    pu.add_argument("--repo-id", help="owner/name (default: export.hub.repo_id of the recipe)")
    vis = pu.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=None, help="create the repo private")
    vis.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    pu.add_argument("--dry-run", action="store_true", help="check the folder and list the files; upload nothing")
    pu.add_argument("--timeout", type=_hub_timeout_arg, metavar="SECONDS",
                    help="longest wait for each Hub network operation (default: $HEADWISE_HUB_TIMEOUT, else 60)")
    pu.add_argument("--retries", type=_hub_retries_arg, metavar="N",
                    help="further tries of a Hub call that timed out or got a 408/429/5xx answer "
                         "(default: $HEADWISE_HUB_RETRIES, else 3)")
    pu.set_defaults(func=_cmd_push)

    g = sub.add_parser("generate", help="generate text with an export folder or any causal LM")
    g.add_argument("path", help="export folder, saved model folder, Hub id or alias")
    g.add_argument("prompt", type=_prompt_arg)
    g.add_argument("--max-new-tokens", type=_positive_int_arg, default=32,
                   help="tokens to generate, 1 or more (default 32)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--attn-implementation", choices=["sdpa", "eager"], default=None,
                   help="the model's own attention (default: SDPA where transformers has it for the family, else eager)")
    g.add_argument(
        "--policy",
        help="KV-cache policy overriding the export's: JSON ('{\"type\": \"h2o\", \"heavy_ratio\": 0.1, \"recent_ratio\": 0.1}') "
        "or TYPE[:key=value,...] (h2o:heavy_ratio=0.1,recent_ratio=0.1; streaming:sink=4,recent=1024; full)",
    )
    g.add_argument("--static", action="store_true", help="greedy decoding with static shapes (a CUDA graph per step on GPU)")
    g.add_argument("--compile", action="store_true",
                   help="like --static, with the step fused by torch.compile first (fastest decode; compiling takes about a minute)")
    g.set_defaults(func=_cmd_generate)

    ev = sub.add_parser("eval", help="perplexity on long text and passkey retrieval (with a heatmap PNG)")
    # lazy: the wing pulls in torch, and `headwise --help` stays fast
    from headwise.eval.command import configure_eval_parser

    configure_eval_parser(ev)  # adds the arguments and sets func

    r = sub.add_parser("recipe", help="show, validate or list recipes")
    r.add_argument("action", choices=["show", "validate", "list", "fields"])
    r.add_argument("recipes", nargs="*", help="recipe files or names; after them, key=value overrides")
    r.set_defaults(func=_cmd_recipe)
    return p


def _split_overrides(args) -> None:
    """`recipe` takes recipes then overrides in one list: overrides are the items with `=` or a `~` prefix,
    except an item naming an existing file, which is a recipe whatever its name (`lr=2e-4.yaml`)."""
    if getattr(args, "command", None) == "recipe":
        from pathlib import Path

        items = args.recipes
        is_override = [("=" in i or i.startswith("~")) and not Path(i).is_file() for i in items]
        args.recipes = [i for i, o in zip(items, is_override) if not o]
        args.overrides = [i for i, o in zip(items, is_override) if o]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    _split_overrides(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"headwise: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
