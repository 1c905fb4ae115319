"""A resumed run whose total steps changed (train.max_steps, ppo.iterations may) continues on
the new schedule from its first resumed step, as an uninterrupted run of the new length."""

import torch

from offline_rlhf.config.schema import OptimConfig
from offline_rlhf.train.schedule import build_scheduler, resume_schedule

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
