"""``persona traits ...``: list, show, import, export, validate, write (with an LLM), template
and delete trait definitions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.table import Table
from rich.text import Text

from db import PersonaError
from db.traits import empty_template, read_trait_file, write_trait_files
from tui.cli.arguments import non_negative_int, output_file, output_folder
from tui.cli.context import db_path, open_store
from tui.cli.output import err, out, printable
from tui.cli.parser import add_command


def cmd_traits_list(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        traits = store.list_traits()
    table = Table(title=f"{len(traits)} traits in {db_path(args)}")
    table.add_column("name", no_wrap=True)
    table.add_column("source", no_wrap=True)
    for column in ("Q", "responses", "judged", "vectors"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("description", ratio=1, min_width=16, overflow="fold")
    for t in traits:
        # Text, not str: a name or description may hold "[" that markup would eat.
        cells = (t.name, t.source, t.n_questions, t.n_responses, t.n_judged, t.n_vectors)
        table.add_row(*(Text(printable(c)) for c in cells), Text(printable(t.description)))
    out.print(table)
    return 0


def cmd_traits_show(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        trait = store.get_trait(args.name)
    if args.json:
        out.print_json(json.dumps(trait.to_dict(), ensure_ascii=False))
        return 0
    label = printable(f" ({trait.assistant_label} assistant)")
    out.print(Text.assemble((printable(trait.name), "bold"), label))
    out.print(printable(trait.description), markup=False)
    for i, pair in enumerate(trait.instructions, 1):
        out.print(f"\n[bold]pair {i}[/bold]")
        out.print(Text.assemble("  ", ("pos ", "green"), printable(pair.pos)))
        out.print(Text.assemble("  ", ("neg ", "red"), printable(pair.neg)))
    for split in ("extract", "eval"):
        out.print(f"\n[bold]{split} questions[/bold]")
        for i, q in enumerate(trait.questions_for(split), 1):
            out.print(f"  {i:2d}. ", printable(q), markup=False)
    out.print("\n[bold]judge prompt[/bold]")
    out.print(printable(trait.eval_prompt), markup=False)
    return 0


def cmd_traits_import(args: argparse.Namespace) -> int:
    trait = read_trait_file(
        args.path,
        name=args.name,
        description=args.description or "",
        assistant_name=args.assistant_name or "",
    ).validate()
    with open_store(args) as store:
        store.save_trait(trait, source=f"imported:{Path(args.path).name}", replace=args.force)
    out.print(f"imported trait {trait.name} (5 pairs, 40 questions)")
    return 0


def cmd_traits_export(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        trait = store.get_trait(args.name)
    for path in write_trait_files(trait, args.out, args.format):
        out.print(f"wrote {path}")
    return 0


def cmd_traits_validate(args: argparse.Namespace) -> int:
    """Validate files when paths are given, else every trait in the database."""
    failures = 0
    if args.paths:
        checked = []
        for path in args.paths:
            try:
                checked.append((str(path), read_trait_file(path, name=args.name).problems()))
            except PersonaError as exc:
                checked.append((str(path), [str(exc)]))
    else:
        with open_store(args) as store:
            checked = [(t.name, store.get_trait(t.name).problems()) for t in store.list_traits()]
    for label, problems in checked:
        if problems:
            failures += 1
            for problem in problems:
                err.print(Text.assemble(("FAIL ", "red"), f"{label}: {problem}"))
        else:
            out.print(Text.assemble(("ok   ", "green"), label))
    if failures:
        err.print(f"{failures} of {len(checked)} trait definitions are invalid")
        return 1
    return 0


def cmd_traits_new(args: argparse.Namespace) -> int:
    from pipeline.author import AuthorParams, create_author_job
    from pipeline.jobs import run_job

    params = AuthorParams(
        name=args.name,
        description=args.description,
        author=args.author,
        base_url=args.base_url,
        thinking=args.thinking,
        assistant_name=args.assistant_name,
    )
    with open_store(args) as store:
        job_id = create_author_job(store, params, force=args.force)
    with err.status(f"asking {args.author} to write trait {args.name}"):
        run_job(db_path(args), job_id)
    out.print(f"wrote trait {args.name}; review it with `persona traits show {args.name}`")
    return 0


def cmd_traits_template(args: argparse.Namespace) -> int:
    payload = json.dumps(empty_template(args.name, args.description or ""), indent=2)
    if args.out:
        if Path(args.out).exists() and not args.force:
            raise PersonaError(f"{args.out} exists; pass --force to overwrite it or pick a path")
        Path(args.out).write_text(payload + "\n", encoding="utf-8")
        out.print(f"wrote {args.out}; fill it in, then `persona traits import {args.out}`")
    else:
        print(payload)
    return 0


def cmd_traits_delete(args: argparse.Namespace) -> int:
    from pipeline.deletion import delete_trait, trait_contents

    with open_store(args) as store:
        contents = trait_contents(store, args.name)
        if not args.yes:
            if not sys.stdin.isatty():
                raise PersonaError(
                    f"deleting trait '{args.name}' removes {contents.summary()}; "
                    "pass --yes to confirm"
                )
            answer = input(f"delete trait '{args.name}': {contents.summary()}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                out.print("nothing deleted")
                return 1
        deleted = delete_trait(store, args.name)
    out.print(f"deleted trait {args.name}: {deleted.summary()}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    from pipeline.author import DEFAULT_AUTHOR

    traits = commands.add_parser("traits", help="list, show, import, export, validate traits")
    traits_cmds = traits.add_subparsers(dest="traits_command", metavar="ACTION", required=True)
    add_command(traits_cmds, "list", cmd_traits_list, "list the traits in the database with counts")
    show = add_command(traits_cmds, "show", cmd_traits_show, "print one trait definition")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print the studio JSON format")
    imp = add_command(
        traits_cmds,
        "import",
        cmd_traits_import,
        "import a trait: a studio JSON file, an original trait_data_{extract,eval}/NAME.json "
        "file, or an original root folder with --name",
    )
    imp.add_argument("path")
    imp.add_argument(
        "--name", help="picks NAME.json in an original root folder; renames a file's trait"
    )
    imp.add_argument("--description", help="description, for original-format files")
    imp.add_argument("--assistant-name", help='adjective for "You are a/an ... assistant."')
    imp.add_argument("--force", action="store_true", help="replace a trait of the same name")
    exp = add_command(traits_cmds, "export", cmd_traits_export, "write a trait to files")
    exp.add_argument("name")
    exp.add_argument(
        "--out", type=output_folder, default=".", help="folder to write into (default: .)"
    )
    exp.add_argument(
        "--format",
        choices=("original", "studio"),
        default="original",
        help="original: trait_data_extract/ and trait_data_eval/; studio: one NAME.json",
    )
    val = add_command(
        traits_cmds,
        "validate",
        cmd_traits_validate,
        "check trait files (or, with no path, every trait in the database)",
    )
    val.add_argument("paths", nargs="*", type=Path)
    val.add_argument("--name", help="trait name when a path is an original root folder")
    new = add_command(
        traits_cmds, "new", cmd_traits_new, "have an LLM write a trait from a description"
    )
    new.add_argument("name")
    new.add_argument("--description", required=True)
    new.add_argument(
        "--author",
        default=DEFAULT_AUTHOR,
        help=f"KIND:MODEL, anthropic, openai or local "
        f"(default {DEFAULT_AUTHOR}; keys from ANTHROPIC_API_KEY / OPENAI_API_KEY)",
    )
    new.add_argument("--base-url", help="an Anthropic- or OpenAI-compatible server")
    new.add_argument(
        "--thinking", type=non_negative_int, default=0, help="Anthropic thinking budget, tokens"
    )
    new.add_argument("--assistant-name", help='adjective for "You are a/an ... assistant."')
    new.add_argument("--force", action="store_true", help="replace a trait of the same name")
    tpl = add_command(
        traits_cmds, "template", cmd_traits_template, "print an empty trait to fill in"
    )
    tpl.add_argument("name")
    tpl.add_argument("--description")
    tpl.add_argument("--out", type=output_file, help="write to this file instead of stdout")
    tpl.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    dele = add_command(traits_cmds, "delete", cmd_traits_delete, "delete a trait and all its data")
    dele.add_argument("name")
    dele.add_argument("--yes", action="store_true", help="do not ask (needed without a TTY)")
