"""A resumed run whose total steps changed (train.max_steps, ppo.iterations may) continues on
the new schedule from its first resumed step, as an uninterrupted run of the new length; and
the optimizer decays matrices, not norm scales (older one-group checkpoints resume into both groups)."""

import torch

from offline_rlhf.checkpoint import CheckpointMeta, TrainState, load_checkpoint, save_checkpoint
from offline_rlhf.config.schema import OptimConfig
from offline_rlhf.train.schedule import build_optimizer, build_scheduler, resume_schedule
from tests.fixtures import reference_model

COSINE = OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine")


def rates(total: int, steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=COSINE.lr)
    scheduler = build_scheduler(optimizer, total, COSINE)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def test_a_resume_with_more_steps_takes_the_new_schedules_rate_at_once():
    saved_optimizer, saved = rates(total=6, steps=6)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=COSINE.lr)
    optimizer.load_state_dict(saved_optimizer.state_dict())  # its rates: the 6-step schedule's
    scheduler = build_scheduler(optimizer, 8, COSINE)
    resume_schedule(scheduler, saved.state_dict())
    straight_optimizer, straight = rates(total=8, steps=6)
    assert optimizer.param_groups[0]["lr"] == straight_optimizer.param_groups[0]["lr"] != \
        saved_optimizer.param_groups[0]["lr"]
    assert scheduler.get_last_lr() == straight.get_last_lr()
    same_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=COSINE.lr)
    same_optimizer.load_state_dict(saved_optimizer.state_dict())
    same = build_scheduler(same_optimizer, 6, COSINE)
    resume_schedule(same, saved.state_dict())  # an unchanged schedule resumes bit for bit
    assert same_optimizer.param_groups[0]["lr"] == saved_optimizer.param_groups[0]["lr"]


def test_weight_decay_shrinks_matrices_but_not_norm_scales():
    """A step with zero gradients moves a decayed weight by lr * wd * w, an undecayed one
    not at all (AdamW's update is 0 for a zero gradient at the first step)."""
    model = reference_model()
    optimizer = build_optimizer(model.parameters(), OptimConfig(lr=0.1, weight_decay=0.5), torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for name, param in model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if param.ndim >= 2 else before[name]
        torch.testing.assert_close(param.detach(), expected, msg=name)
    assert any(p.ndim < 2 for p in model.parameters())  # norms to leave alone
    undecayed = build_optimizer(model.parameters(), OptimConfig(lr=0.1), torch.device("cpu"))
    assert len(undecayed.param_groups) == 1  # as checkpoints written before hold it


def test_a_one_group_checkpoint_resumes_into_the_decay_and_no_decay_groups(tmp_path):
    """Was: a checkpoint saved before 1-D parameters were spared weight decay (one optimizer
    group) failed to load ('Missing key ... param_groups.1.weight_decay'). Its moments move to
    this run's two groups, whose rates follow the schedule alike."""
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=2)
    model = reference_model()
    old = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)  # as before: one group
    old_schedule = build_scheduler(old, 10, cfg)
    model(torch.randint(0, 50, (2, 8))).float().pow(2).mean().backward()
    old.step()
    old_schedule.step()
    save_checkpoint(tmp_path, model, CheckpointMeta(model.cfg, "lm", TrainState(step=1),
                                                    scheduler=old_schedule.state_dict()), optimizer=old)

    resumed = reference_model()  # a new process's
    optimizer = build_optimizer(resumed.parameters(), cfg, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, 10, cfg)
    meta = load_checkpoint(tmp_path / "step_00000001", resumed, optimizer)
    resume_schedule(scheduler, meta.scheduler)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    for param, saved in zip(resumed.parameters(), model.parameters(), strict=True):
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizer.state[param][moment], old.state[saved][moment])
    assert [group["lr"] for group in optimizer.param_groups] == [old.param_groups[0]["lr"]] * 2
    scheduler.step()
    old_schedule.step()
    assert scheduler.get_last_lr() == old_schedule.get_last_lr() * 2
