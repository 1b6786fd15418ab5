#!/usr/bin/env python3
"""Runs the commands of a README section and compares what they print with
the output shown under each of them.

The section is a run of fenced blocks: every ```sh block is one command, and
the fenced block right after it is the output it prints (stdout and stderr,
as a terminal shows them). Commands run in order, each with `bash -c`, with
`localhost:8080` replaced by the given address.

Only what the server makes up is normalised: UUIDv7 ids become <id-1>,
<id-2>... in order of first appearance, so an id that comes back later must
still be the same id.

    readme_walkthrough.py README.md "grpcurl walkthrough" 127.0.0.1:PORT
    readme_walkthrough.py README.md "grpcurl walkthrough" 127.0.0.1:PORT --max-time 10
    readme_walkthrough.py README.md "grpcurl walkthrough" 127.0.0.1:PORT --update

--max-time N runs every grpcurl command with `-max-time N`, a deadline on
each call, as most clients set one: the outputs must be the same.
--update writes the real outputs into the README instead of comparing.
"""

import difflib
import re
import subprocess
import sys

README_ADDR = "localhost:8080"
# Seconds one command may take before it counts as hung.
COMMAND_TIMEOUT = 30
UUID7 = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\b")

# The names grpcurl prints after "Code:" (grpc-go's), by status code.
GRPC_CODES = [
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
    "Aborted", "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss",
    "Unauthenticated",
]


def grpcurl_exit_status(output):
    """The exit status grpcurl gives the error status it printed: 64 + its code."""
    match = re.search(r"^\s*Code: (\w+)$", output, re.MULTILINE)
    if match is None or match.group(1) not in GRPC_CODES:
        return None
    return 64 + GRPC_CODES.index(match.group(1))

def section_lines(lines, title):
    """The index range of the section under the heading `title` (at any
    level): up to the next heading of the same level or a higher one, so its
    subsections are part of it. Lines in fenced blocks are never headings."""
    heading = re.compile(r"^(#{1,6}) (.*?)\s*$")
    level, start, fenced = None, None, False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else heading.match(line)
        if match is None:
            continue
        if level is None:
            if match.group(2) == title:
                level, start = len(match.group(1)), i + 1
        elif len(match.group(1)) <= level:
            return start, i
    if level is None:
        sys.exit(f"no section '{title}'")
    return start, len(lines)


def fenced_blocks(lines, start, end):
    """(language, first content line, end line) of each fenced block."""
    blocks, i = [], start
    while i < end:
        if lines[i].startswith("```"):
            lang = lines[i][3:].strip()
            close = next(j for j in range(i + 1, end) if lines[j].startswith("```"))
            blocks.append((lang, i + 1, close))
            i = close
        i += 1
    return blocks


def normalise(text):
    ids = {}
    text = UUID7.sub(lambda m: ids.setdefault(m.group(), f"<id-{len(ids) + 1}>"), text)
    return [line.rstrip() for line in text.rstrip().splitlines()]


def main():
    readme, title, addr = sys.argv[1:4]
    options = sys.argv[4:]
    update = "--update" in options
    max_time = options[options.index("--max-time") + 1] if "--max-time" in options else None
    with open(readme) as f:
        lines = f.readlines()
    blocks = fenced_blocks(lines, *section_lines(lines, title))

    steps = []
    for n, (lang, first, end) in enumerate(blocks):
        if lang != "sh":
            continue
        if n + 1 == len(blocks) or blocks[n + 1][0] == "sh":
            sys.exit(f"{readme}:{first}: a command with no output block after it")
        steps.append(("".join(lines[first:end]), blocks[n + 1]))

    failed = 0
    replacements = []
    for command, (_, out_first, out_end) in steps:
        shown = "$ " + command.splitlines()[0]
        print(shown if len(shown) < 100 else shown[:96] + " ...", flush=True)
        expected = "".join(lines[out_first:out_end])
        runnable = command.replace(README_ADDR, addr)
        if max_time is not None:
            runnable = re.sub(r"\bgrpcurl ", f"grpcurl -max-time {max_time} ", runnable)
        try:
            run = subprocess.run(
                ["bash", "-c", runnable],
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=COMMAND_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            print(f"  FAIL: no answer within {COMMAND_TIMEOUT}s")
            failed += 1
            continue
        actual = run.stdout.replace(addr, README_ADDR)
        replacements.append((out_first, out_end, actual.rstrip() + "\n"))
        # A command fails only where the README shows the error it prints
        # (with --update: where grpcurl prints an error status).
        shows_error = (actual if update else expected).startswith("ERROR:")
        if run.returncode != 0 and not shows_error:
            print(f"  FAIL: exit status {run.returncode}\n{actual}")
            failed += 1
        elif shows_error and run.returncode != grpcurl_exit_status(actual):
            # grpcurl exits with 64 + the status code, as the README says.
            print(f"  FAIL: exit status {run.returncode} for\n{actual}")
            failed += 1
        elif not update and normalise(expected) != normalise(actual):
            print(f"  FAIL: output differs from {readme}:{out_first + 1}")
            diff = difflib.unified_diff(
                normalise(expected), normalise(actual), "README", "actual", lineterm=""
            )
            print("\n".join("    " + line for line in diff))
            failed += 1

    if update:
        for first, end, text in reversed(replacements):
            lines[first:end] = [text]
        with open(readme, "w") as f:
            f.writelines(lines)
        print(f"{readme}: wrote the output of {len(replacements)} commands")
    deadline = f" (each call with -max-time {max_time})" if max_time is not None else ""
    print(
        f"{title}: {len(steps) - failed} of {len(steps)} commands print what {readme} shows"
        + deadline
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
