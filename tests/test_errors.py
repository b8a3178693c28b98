"""One error base (data_prep/errors.py FinetuneError) carrying its exit code: every error class of the project reaches
the user as one line with the code it declares, whatever module defines it."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import typer


def _all_error_classes():
    import data_prep
    import finetune
    from data_prep.errors import FinetuneError

    for pkg in (finetune, data_prep):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if mod.name.endswith("__main__"):
                continue
            importlib.import_module(mod.name)
    seen, todo = [], [FinetuneError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def test_every_error_class_exits_with_its_own_code_and_one_line(capsys):
    from finetune.cli import guard

    classes = _all_error_classes()
    names = {c.__name__ for c in classes}
    # the ones that once needed a list in the CLI, and the teacher's, which printed a traceback
    assert {"DataError", "UserError", "PublishRefused", "StageFailed", "TeacherError", "MergeError", "StaleInputs"} <= names, names
    for cls in classes:
        def boom(cls=cls):
            err = cls.__new__(cls)  # some take more arguments (RejectRateExceeded: the rejects); the message is what counts
            Exception.__init__(err, f"{cls.__name__} happened")
            raise err

        with pytest.raises(typer.Exit) as e:
            guard(boom)()
        assert e.value.exit_code == cls.exit_code, cls
        err = capsys.readouterr().err
        assert err.strip() == f"error: {cls.__name__} happened", (cls, err)
    assert {c.exit_code for c in classes} == {1, 2, 3}


def test_a_tokenizer_without_a_chat_template_stops_the_build_but_a_bad_row_is_rejected():
    """Told apart by type, not by searching the message."""
    from data_prep.errors import DataError, RowError
    from finetune.templates import row_encoder

    class NoTemplate:
        chat_template = None
        eos_token_id = 2
        bos_token_id = None

    enc = row_encoder(NoTemplate(), "chat")
    with pytest.raises(DataError, match="data.template: data.template is `chat` but the tokenizer has no chat template"):
        enc({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    with pytest.raises(RowError, match="alpaca template renders instruction/input/output rows, not messages"):
        row_encoder(NoTemplate(), "alpaca")({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
