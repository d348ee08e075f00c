"""The documentation of a configuration key: the string literal under its field in the model.

Read from the source only when a schema is generated: pydantic's `use_attribute_docstrings`
would parse every model's source at each start of the supervisor and of every local command.
"""

from __future__ import annotations

import ast
import inspect
import textwrap


def attribute_docstrings(cls: type) -> dict[str, str]:
    """{field: docstring} for each annotated field of `cls` followed by a string literal."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen or generated class)
        return {}
    definition = ast.parse(source).body[0]
    if not isinstance(definition, ast.ClassDef):
        return {}
    docs: dict[str, str] = {}
    for statement, following in zip(definition.body, definition.body[1:], strict=False):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs
