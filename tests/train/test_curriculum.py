"""Early-exit curricula and weights, against the paper's formulas and worked example, in exits
E = blocks run (1..L; E = L the full model). The curriculum hands the model block indices E - 1."""
import pytest

from train.config import ExitConfig
from train.layerskip.curriculum import ExitCurriculum


def _exits(cur: ExitCurriculum, step: int) -> list[int]:
    """The exits E in the loss at `step`."""
    return [l + 1 for l in cur.active(step)]


def test_paper_weights_worked_example():
    # The paper's active exits {0, 8, 16, 24, 31} (its block indices) are E = {1, 9, 17, 25, 32}.
    cur = ExitCurriculum(ExitConfig(exits=[1, 9, 17, 25], curriculum="fixed", e_scale=0.2), 32, 100)
    w = cur.weights(0)
    assert [l + 1 for l in w] == [1, 9, 17, 25, 32]
    assert [round(v, 4) for v in w.values()] == [0.0, 0.0330, 0.1245, 0.2747, 0.5678]
    assert sum(w.values()) == pytest.approx(1.0)  # exit 1 has weight 0 under the paper's e (its e(0))
    assert cur.capture(0) == [0, 8, 16, 24]  # the blocks whose outputs the model returns


def test_uniform_and_linear_weights():
    u = ExitCurriculum(ExitConfig(exits=[2, 4], curriculum="fixed", weighting="uniform"), 6, 10).weights(0)
    assert u == pytest.approx({1: 1 / 3, 3: 1 / 3, 5: 1 / 3})
    lin = ExitCurriculum(ExitConfig(exits=[2, 4], curriculum="fixed", weighting="linear"), 6, 10).weights(0)
    assert lin == pytest.approx({1: 2 / 12, 3: 4 / 12, 5: 6 / 12})  # proportional to E


def test_rotational_curriculum_step_by_step():
    cur = ExitCurriculum(ExitConfig(exits="1::2", curriculum="rotational", period=4), 8, 100)
    # (E - 1 - t) mod 4 == 0 among E in {1, 3, 5, 7}; the full model (8) is always on.
    expected = {0: [1, 5, 8], 1: [8], 2: [3, 7, 8], 3: [8], 4: [1, 5, 8], 6: [3, 7, 8], 9: [8]}
    assert {t: _exits(cur, t) for t in expected} == expected
    assert cur.capture(2) == [2, 6]
    every = ExitCurriculum(ExitConfig(exits="1:", curriculum="rotational", period=3), 8, 100)
    assert [_exits(every, t) for t in range(3)] == [[1, 4, 7, 8], [2, 5, 8], [3, 6, 8]]


def test_gradual_curriculum_switches_on_from_the_top_and_is_full_by_half():
    cur = ExitCurriculum(ExitConfig(exits="1:", curriculum="gradual"), 4, 16)
    # E switches on at t >= (4 - E) * 16 / 8 = 2 (4 - E): exit 3 at 2, exit 2 at 4, exit 1 at 6.
    assert [_exits(cur, t) for t in range(7)] == [
        [4], [4], [3, 4], [3, 4], [2, 3, 4], [2, 3, 4], [1, 2, 3, 4]]
    big = ExitCurriculum(ExitConfig(exits="1:", curriculum="gradual"), 32, 1000)
    assert _exits(big, 500) == list(range(1, 33))
    assert 1 not in _exits(big, 484) and 1 in _exits(big, 485)  # 31 * 1000 / 64 = 484.4


def test_fixed_curriculum_uses_every_listed_exit():
    cur = ExitCurriculum(ExitConfig(exits=[6, 2, 8], curriculum="fixed"), 8, 10)
    assert all(_exits(cur, t) == [2, 6, 8] for t in range(10))


def test_resume_continues_exactly_and_reports_changed_settings():
    cfg = ExitConfig(exits="1:", curriculum="rotational", period=3)
    straight = ExitCurriculum(cfg, 8, 20)
    reference = [straight.advance() for _ in range(10)]

    first = ExitCurriculum(cfg, 8, 20)
    got = [first.advance() for _ in range(4)]
    state = first.state_dict()
    resumed = ExitCurriculum(cfg, 8, 20)
    resumed.load_state_dict(state)
    got += [resumed.advance() for _ in range(6)]
    assert got == reference

    changed = ExitCurriculum(ExitConfig(exits="1:", curriculum="rotational", period=4), 8, 20)
    with pytest.raises(ValueError, match="period"):
        changed.load_state_dict(state)
    with pytest.warns(UserWarning, match="period"):
        changed.load_state_dict(state, strict=False)
    assert changed.position == 4


def test_checkpoint_of_block_indices_resumes_as_the_same_exits():
    """A checkpoint whose fingerprint lists block indices ("layers", written before exits were
    counted in blocks run) resumes a run with the same exits; other exits are reported, in E."""
    old = {"position": 5, "fingerprint": {"layers": [0, 2, 4], "curriculum": "rotational", "period": 2,
                                          "e_scale": 0.2, "weighting": "paper", "n_layers": 6,
                                          "total_steps": 10}}
    same = ExitCurriculum(ExitConfig(exits=[1, 3, 5], period=2), 6, 10)
    same.load_state_dict(old)
    assert same.position == 5
    with pytest.raises(ValueError, match=r"exits: \[1, 3, 5\] -> \[2, 4\]"):
        ExitCurriculum(ExitConfig(exits=[2, 4], period=2), 6, 10).load_state_dict(old)
