#!/usr/bin/env python3
"""Checks the relative links of the project's Markdown files, so that the
README and the pages in docs/ cannot point at nothing.

Every link and image that is not a URL (`http:`, `mailto:`, ...) must name
a file or directory of the repository, relative to the page it is on; an
`#anchor` must be a heading of the page it names, spelled as GitHub spells
heading anchors: the heading's text, lowercased, punctuation removed (`-`
and `_` stay), each space a hyphen, and `-1`, `-2`... after a repeated one.
Links inside code (fenced blocks and `inline code`) are not links.

The list under the README's `## Contents` must also link every `##` and
`###` heading of the README, and only headings, so that the table of
contents stays whole.

    scripts/check-links.py            # README.md, the other top-level pages, docs/*.md
    scripts/check-links.py FILE.md... # those files

Exits 1 naming each broken link by file and line, 0 when there is none.
"""

import glob
import os
import re
import sys
import unicodedata
from urllib.parse import unquote

ROOT = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
README = os.path.join(ROOT, "README.md")
CONTENTS = "Contents"

FENCE = re.compile(r"^ {0,3}(```+|~~~+)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
# A code span: a run of backticks, then anything but a blank line, then the
# same run (CommonMark). Its content is not Markdown.
CODE_SPAN = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)+?(?<!`)\1(?!`)", re.S)
COMMENT = re.compile(r"<!--.*?-->", re.S)
# [text](target "title") and ![alt](target); the text may hold one level of
# brackets (an image inside a link).
LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"
    r"\(\s*(?:<([^>\n]*)>|([^\s)]*))(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"
)
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_TARGET = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*\"([^\"]*)\"", re.I)
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:name|id)\s*=\s*\"([^\"]*)\"", re.I)
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def blank_code(text):
    """The text with fenced blocks, code spans and HTML comments blanked out,
    line breaks kept, so that offsets still give line numbers."""
    lines, fenced = text.split("\n"), None
    for i, line in enumerate(lines):
        match = FENCE.match(line)
        if fenced is not None:
            if match and match.group(1)[0] == fenced[0] and len(match.group(1)) >= len(fenced):
                fenced = None
            lines[i] = ""
        elif match:
            fenced = match.group(1)
            lines[i] = ""
    text = "\n".join(lines)
    blank = lambda m: re.sub(r"[^\n]", " ", m.group())
    return CODE_SPAN.sub(blank, COMMENT.sub(blank, text))


def headings(text):
    """(level, raw text, line number) of each heading outside fenced blocks."""
    found, fenced = [], None
    for number, line in enumerate(text.split("\n"), 1):
        match = FENCE.match(line)
        if fenced is not None:
            if match and match.group(1)[0] == fenced[0] and len(match.group(1)) >= len(fenced):
                fenced = None
            continue
        if match:
            fenced = match.group(1)
            continue
        match = HEADING.match(line)
        if match:
            found.append((len(match.group(1)), match.group(2), number))
    return found


def rendered(heading):
    """A heading's text as GitHub renders it: no markup, code spans' content
    kept as it is."""
    spans = []

    def keep(match):
        spans.append(match.group()[len(match.group(1)) : -len(match.group(1))].strip())
        return f"\0{len(spans) - 1}\0"

    text = CODE_SPAN.sub(keep, heading)
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", text)  # images: their alt text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("*", "")  # emphasis
    return re.sub(r"\0(\d+)\0", lambda m: spans[int(m.group(1))], text)


def slug(heading):
    """GitHub's anchor for a heading (github-slugger): lowercase, every
    character that is not a letter, a mark, a number, `-`, `_` or a space
    removed, then each space a hyphen."""
    text = rendered(heading).strip().lower()
    kept = "".join(
        c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LMN"
    )
    return kept.replace(" ", "-")


def anchors(text):
    """Every anchor a page has: its headings' (repeats numbered as GitHub
    numbers them) and explicit `<a name>`/`<a id>` ones."""
    seen, found = {}, set()
    for _, heading, _ in headings(text):
        base = slug(heading)
        anchor = base
        while anchor in seen:
            seen[base] += 1
            anchor = f"{base}-{seen[base]}"
        seen[anchor] = 0
        found.add(anchor)
    found.update(HTML_ANCHOR.findall(text))
    return found


_pages = {}


def page_anchors(path):
    if path not in _pages:
        with open(path, encoding="utf-8") as f:
            _pages[path] = anchors(f.read())
    return _pages[path]


def targets(text):
    """(line number, target) of each link, image and reference definition."""
    code_free = blank_code(text)
    line_of = lambda offset: code_free.count("\n", 0, offset) + 1
    for match in LINK.finditer(code_free):
        yield line_of(match.start()), match.group(1) if match.group(1) is not None else match.group(2)
    for pattern in (REFERENCE, HTML_TARGET):
        for match in pattern.finditer(code_free):
            yield line_of(match.start()), match.group(1)


def problem(page, target):
    """What is wrong with `target`, linked from `page`, or None."""
    if URL.match(target):
        return None
    path, _, anchor = target.partition("#")
    if path == "" and anchor == "":
        return "an empty link"
    file = os.path.realpath(os.path.join(os.path.dirname(page), unquote(path))) if path else page
    if os.path.commonpath([file, ROOT]) != ROOT:
        return f"{target}: outside the repository"
    if not os.path.exists(file):
        return f"{target}: no such file or directory"
    if anchor and file.endswith(".md") and unquote(anchor) not in page_anchors(file):
        return f"{target}: no heading of {os.path.relpath(file, ROOT)} has the anchor #{anchor}"
    return None


def contents_problems(text):
    """What the README's Contents list misses, or lists that is not a
    heading of the README."""
    listed, inside, level = set(), False, 0
    code_free = blank_code(text).split("\n")
    for heading_level, heading, number in headings(text):
        if heading == CONTENTS:
            inside, level, start = True, heading_level, number
        elif inside and heading_level <= level:
            end = number
            break
    else:
        if not inside:
            return [f"README.md: no '{CONTENTS}' heading"]
        end = len(code_free) + 1
    # The list: its items and their indented continuation lines; a paragraph
    # after it may link other pages.
    for line in code_free[start : end - 1]:
        if re.match(r"^\s*(?:[-*+]|\d+[.)])\s|^\s+\S", line):
            listed.update(match.group(2) for match in LINK.finditer(line) if match.group(2))
    problems = []
    for anchor_level, heading, number in headings(text):
        if anchor_level in (2, 3) and heading != CONTENTS:
            if "#" + slug(heading) not in listed:
                problems.append(f"README.md:{number}: '{heading}' is not in the {CONTENTS}")
    for target in sorted(listed):
        if not target.startswith("#"):
            problems.append(f"README.md:{start}: the {CONTENTS} links {target}, not a heading of the README")
    return problems


def main():
    pages = sys.argv[1:] or sorted(
        glob.glob(os.path.join(ROOT, "*.md")) + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    )
    problems, links = [], 0
    for page in pages:
        page = os.path.realpath(page)
        with open(page, encoding="utf-8") as f:
            text = f.read()
        for number, target in targets(text):
            links += 1
            wrong = problem(page, target)
            if wrong:
                problems.append(f"{os.path.relpath(page, ROOT)}:{number}: {wrong}")
        if page == README:
            problems += contents_problems(text)
    for line in problems:
        print(line)
    print(f"links: {links} in {len(pages)} pages, {len(problems)} broken")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
