"""`medvqa prompts`: the registered prompt policies (what `--prompt-policy` accepts)."""

from __future__ import annotations

import argparse
import json

ORDER = 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prompts",
        help="list the prompt policies (--prompt-policy NAME; NAME+options adds [yes, no] to CLOSED)",
        description="List the prompt policies. Any NAME also exists as NAME+options (the closed-question "
        "options line added to questions the dataset marks CLOSED) and NAME-options.",
    )
    p.add_argument("--json", action="store_true", help="print each policy's full definition as JSON")
    p.add_argument("--show", metavar="NAME", help="render one policy on an example OPEN and CLOSED question")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medvqa.prompts import get_policy, policy_names

    if args.show:
        policy = get_policy(args.show)
        for answer_type, question in (("OPEN", "What organ is shown?"), ("CLOSED", "Is this a CT scan?")):
            prompt = policy.render(question, answer_type)
            print(f"--- {answer_type}")
            print(prompt.text if prompt.text is not None else json.dumps(list(prompt.messages), indent=2))
        return 0
    policies = [get_policy(name) for name in policy_names()]
    if args.json:
        print(json.dumps([p.to_json() for p in policies], indent=2))
        return 0
    width = max(len(p.name) for p in policies)
    for p in policies:
        print(f"{p.name:<{width}}  {p.description}")
    return 0
