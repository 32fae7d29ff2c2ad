"""The workflow's config as users write it: numbers given inside ``--config`` mappings typed as
numbers, and a config the schema refuses explained in a paragraph per problem (with the nearest
valid names for a misspelt key) instead of the schema itself.

No torch, no scanpy: the Snakefile imports this module before any job runs.
"""

from __future__ import annotations

import datetime
import difflib
import re
from collections.abc import Iterator

# What a YAML 1.2 reader takes for a number (YAML 1.1, which PyYAML follows, reads 1e-3 as text).
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_INTEGER = re.compile(r"[-+]?\d+")
_CONSTANTS = {"true": True, "false": False, "null": None, "~": None}


def typed_scalar(text: str):
    """A ``--config`` scalar as YAML types it: a number, a boolean, null, or the text itself.

    Parameters
    ----------
    text : str
        The scalar as Snakemake read it.

    Returns
    -------
    int, float, bool, None or str
        ``"800"`` gives 800, ``"1e-3"`` 0.001, ``"true"`` True, ``"null"`` None; anything else,
        dates included, stays text.
    """
    if _INTEGER.fullmatch(text):
        return int(text)
    if _NUMBER.fullmatch(text):
        return float(text)
    return _CONSTANTS.get(text.lower(), text)


def typed_overrides(overrides: dict, schema: dict, texts=()) -> dict:
    """``--config`` settings typed as the schema asks: numbers as numbers, names as text.

    Snakemake types a top-level ``--config key=800`` itself (``run=007`` becomes the number 7,
    quotes or not), but reads a mapping such as ``hvg={"n_top_genes": 800}`` with YAML's
    BaseLoader, which leaves every scalar a string, so the schema would refuse ``'800'`` as
    "not of type 'integer'".

    Parameters
    ----------
    overrides : dict
        ``workflow.config_settings.config``: what ``--config`` set, as Snakemake typed it.
    schema : dict
        ``config/schema.yaml``, loaded.
    texts : iterable of str, optional
        The ``--config`` arguments as given (``workflow.config_settings.config_args``,
        ``key=value``): where the schema asks for text, a top-level value is taken as written.

    Returns
    -------
    dict
        The same settings. Where the schema asks for text (or null), a top-level value is its
        text as given (``run=007`` names the run ``007``), a nested whole number its text, and
        a string stays a string; elsewhere strings nested in mappings and lists are typed by
        :func:`typed_scalar`, and top-level values are left as Snakemake typed them.
    """
    written = dict(text.split("=", 1) for text in texts or () if "=" in text)

    def text_only(sub) -> bool:  # the schema asks for a name (or null)
        types = sub.get("type", []) if isinstance(sub, dict) else []
        types = {types} if isinstance(types, str) else set(types)
        return bool(types) and types <= {"string", "null"}

    def typed(value, sub: dict, nested: bool):
        if isinstance(value, dict):
            fields = sub.get("properties", {}) if isinstance(sub, dict) else {}
            return {key: typed(item, fields.get(key, {}), True) for key, item in value.items()}
        if isinstance(value, list):
            items = sub.get("items", {}) if isinstance(sub, dict) else {}
            return [typed(item, items, True) for item in value]
        if text_only(sub):  # a name: 2024 is its text
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
            if isinstance(value, str) and value.lower() in ("null", "~"):
                return None  # the schema says whether null is allowed
            return value
        return typed_scalar(value) if nested and isinstance(value, str) else value

    fields = schema.get("properties", {})
    typed_values = {}
    for key, value in overrides.items():
        if key in written and text_only(fields.get(key)):  # as written: run=007, run=1e3
            typed_values[key] = written[key].strip().strip("\"'")
        else:
            typed_values[key] = typed(value, fields.get(key, {}), False)
    return typed_values


def own_h5ad_description(config: dict, given: dict) -> None:
    """Keep of ``census.h5ad`` only what the user's own config gives, when it gives any; in place.

    ``census.h5ad`` describes one file (its donor, its columns). Config files given with
    ``--configfile`` are merged over config/demo.yaml, whose description is of the demo's
    PBMC 3k file: a config naming its own file would otherwise inherit the demo's donor id and
    gene-id column for settings it leaves out. Those take the schema's defaults instead; with
    another ``census.source`` no file is read, and the demo's description is dropped.

    Parameters
    ----------
    config : dict
        The merged config, before validation fills the defaults; changed in place.
    given : dict
        What the command line's config files and ``--config`` set, merged
        (``workflow.config_settings.overwrite_config``).
    """
    census = given.get("census")
    own = census.get("h5ad") if isinstance(census, dict) else None
    if isinstance(own, dict):
        config["census"]["h5ad"] = {key: config["census"]["h5ad"][key] for key in own}
    elif config.get("census", {}).get("source", "h5ad") != "h5ad":  # no file is read
        config["census"]["h5ad"] = {}


def integers_as_int(config: dict, schema: dict) -> None:
    """Turn whole floats into ints where the schema asks for an integer, in place.

    JSON Schema counts 1e5 and 3.0 as integers, but Python code given ``3.0`` epochs fails late
    (``range(3.0)``), and a float would give a data folder another key than the same int.

    Parameters
    ----------
    config : dict
        The validated config; changed in place.
    schema : dict
        ``config/schema.yaml``, loaded.
    """
    for key, sub in schema.get("properties", {}).items():
        value = config.get(key) if isinstance(config, dict) else None
        if not isinstance(sub, dict) or value is None:
            continue
        types = sub.get("type", [])
        types = [types] if isinstance(types, str) else types
        if isinstance(value, dict):
            integers_as_int(value, sub)
        elif "integer" in types and isinstance(value, float) and value.is_integer():
            config[key] = int(value)


def nearest_names(name: str, candidates, n: int = 3) -> list[str]:
    """The candidates most like ``name``, best first: the nearest, and up to ``n`` - 1 more
    that are close too (similarity 0.6 or more).

    Spelling similarity (difflib), with abbreviations counted as close: ``learning_rate`` is
    nearest to ``lr`` (its initials), ``n_top`` to ``n_top_genes`` (a prefix).

    Parameters
    ----------
    name : str
        The unknown name.
    candidates : iterable of str
        The valid names.
    n : int
        How many to return.

    Returns
    -------
    list of str
        At least one and at most ``n`` valid names (none when there are no candidates).
    """
    initials = "".join(word[0] for word in name.lower().split("_") if word)

    def closeness(candidate: str) -> float:
        score = difflib.SequenceMatcher(None, name.lower(), candidate.lower()).ratio()
        abbreviation = (
            candidate == initials or candidate.startswith(name) or name.startswith(candidate)
        )
        return score + (1.0 if abbreviation else 0.0)

    ranked = sorted(candidates, key=closeness, reverse=True)
    return ranked[:1] + [other for other in ranked[1:n] if closeness(other) >= 0.6]


def did_you_mean(name: str, candidates) -> str:
    """A sentence naming the candidate spelt most like ``name``, for a message about a column.

    Spelling alone (difflib, ignoring case), unlike ``nearest_names``: a longer column that
    starts with ``name`` (cell_type_ontology_term_id for cell_type) is another column, not a
    misspelling.

    Parameters
    ----------
    name : str
        The name that was not found.
    candidates : iterable of str
        The names there are.

    Returns
    -------
    str
        `` Did you mean 'x'?`` (with a leading space), or ``""`` when none is close (similarity
        under 0.6).
    """
    by_lower = {str(c).lower(): str(c) for c in candidates}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
    return f" Did you mean {by_lower[close[0]]!r}?" if close else ""


def _sections(schema: dict, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """(dotted path, schema) of every mapping in the schema that refuses unknown keys."""
    if schema.get("additionalProperties") is False:
        yield prefix, schema
    for key, sub in schema.get("properties", {}).items():
        if isinstance(sub, dict):
            yield from _sections(sub, f"{prefix}{key}.")


def _value_at(config: dict, dotted: str):
    value = config
    for key in filter(None, dotted.split(".")):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def unknown_key_problems(config: dict, schema: dict) -> list[str]:
    """One paragraph per key the schema does not know, with the nearest valid names.

    Parameters
    ----------
    config : dict
        The config as loaded (config files and ``--config``).
    schema : dict
        ``config/schema.yaml``, loaded.

    Returns
    -------
    list of str
        Empty when every key is known.
    """
    sections = dict(_sections(schema))
    problems = []
    for prefix, section in sections.items():
        given = _value_at(config, prefix)
        known = list(section.get("properties", {}))
        for key in sorted(set(given) - set(known)) if isinstance(given, dict) else []:
            elsewhere = [
                f"{p}{key}" for p, s in sections.items() if key in s.get("properties", {})
            ]
            nearest = " or ".join(f"{prefix}{name}" for name in nearest_names(key, known))
            hint = (
                f"{key} is a setting of {' and '.join(elsewhere)}: move it there."
                if elsewhere
                else f"did you mean {nearest}?"
            )
            problems.append(
                f"unknown setting {prefix}{key}: {hint} "
                f"{prefix.rstrip('.') or 'The top level'} has {len(known)} settings: "
                f"{', '.join(known)} (each documented in config/schema.yaml)."
            )
    return problems


def value_problems(config: dict, schema: dict) -> list[str]:
    """One line per value the schema refuses, naming the setting, the value and the rule.

    Parameters
    ----------
    config : dict
        The config as loaded.
    schema : dict
        ``config/schema.yaml``, loaded.

    Returns
    -------
    list of str
        Empty when the config is valid.
    """
    import jsonschema  # Snakemake's own dependency, needed only here

    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path)):
        if error.validator == "additionalProperties":
            continue  # unknown_key_problems says these, with suggestions
        where = ".".join(str(part) for part in error.absolute_path) or "the config"
        if isinstance(error.instance, datetime.date):  # census_version: 2025-01-30, unquoted
            where += " (write the date in quotes: YAML reads an unquoted date as a date)"
        elif _number_for_text(error):  # run: 2024 in a config file
            where += (
                f' (in a config file write it in quotes, "{error.instance}": YAML reads it as '
                "a number)"
            )
        described = error.schema.get("description", "") if isinstance(error.schema, dict) else ""
        problems.append(
            f"{where}: {error.message}"
            + (f" ({' '.join(described.split())})" if described else "")
        )
    return problems


def _number_for_text(error) -> bool:
    """Is this schema error a number where the schema asks for text?"""
    expected = error.validator_value if error.validator == "type" else None
    expected = [expected] if isinstance(expected, str) else expected or []
    number = isinstance(error.instance, (int, float)) and not isinstance(error.instance, bool)
    return number and "string" in expected


def config_problems(config: dict, schema: dict) -> str | None:
    """What is wrong with the config, as a message for people, or None when nothing is.

    Parameters
    ----------
    config : dict
        The config as loaded (config files and ``--config``).
    schema : dict
        ``config/schema.yaml``, loaded.

    Returns
    -------
    str or None
        Unknown keys (with the nearest valid names) and refused values, one paragraph each.
    """
    problems = unknown_key_problems(config, schema) + value_problems(config, schema)
    if not problems:
        return None
    return "the config has problems:\n\n" + "\n\n".join(problems)
