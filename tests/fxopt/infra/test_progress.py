"""fxopt.progress: bars only on a terminal unless forced; items always pass through."""
import fxopt.infra.progress as P


def test_items_pass_through_with_and_without_a_bar(capsys):
    try:
        P.set_enabled(False)
        assert list(P.progress([1, 2, 3], "x")) == [1, 2, 3]
        assert capsys.readouterr().err == ""
        P.set_enabled(True)
        assert list(P.progress(iter(range(4)), "calibrating", total=4)) == [0, 1, 2, 3]
        assert P.enabled()
    finally:
        P.set_enabled(None)
    assert P.enabled() is False  # pytest's stderr is not a terminal


def test_cli_no_progress_turns_bars_off(monkeypatch):
    from fxopt.tools import cli

    seen = []
    real = P.set_enabled
    monkeypatch.setattr(P, "set_enabled", lambda v: (seen.append(v), real(v)))
    # a bad model spec fails fast, after the flag is applied
    assert cli.main(["optimize", "--no-progress", "--model", "nonsense"]) != 0
    assert seen == [False, None]  # off for the run, the default restored after
    assert cli.main(["passes"]) == 0
    assert seen[-2:] == [None, None]
