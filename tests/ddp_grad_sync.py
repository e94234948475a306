"""Run under torchrun (tests/test_ddp.py): LoRA gradients of sequence_logps through DDP agree across ranks.

Each rank scores a different pair, so equal gradients after backward can only come from DDP's
all-reduce, which happens only for work done inside DDP's forward.
"""

import gc
import sys
import time
import weakref

import torch
import torch.distributed as dist
from peft import get_peft_model

from seqdpo.config import LoraSettings, ModelConfig
from seqdpo.logprobs import PairCollator, sequence_logps
from seqdpo.modeling import load_model_and_tokenizer, make_lora_config


def gradients_agree(rank: int) -> tuple[bool, list]:
    """Whether the gradients agree, and weak references to the tensors handed to the all_gather."""
    model, _ = load_model_and_tokenizer(ModelConfig(name="tiny"))
    torch.manual_seed(0)
    peft_model = get_peft_model(model, make_lora_config(LoraSettings(r=4, alpha=8, dropout=0.0)))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make the A gradients vanish on every rank alike
            torch.nn.init.normal_(p, std=0.02)
    ddp = torch.nn.parallel.DistributedDataParallel(peft_model)
    pair = {"prompt_ids": [5, 10 + rank, 11], "chosen_ids": [20 + rank, 21, 3], "rejected_ids": [30, 31 + rank, 3]}
    out = sequence_logps(ddp, PairCollator()([pair]))
    (out["rejected_logps"] - out["chosen_logps"]).sum().backward()
    grad = torch.cat([p.grad.flatten() for p in peft_model.parameters() if p.requires_grad])
    grads = [torch.zeros_like(grad) for _ in range(dist.get_world_size())]
    dist.all_gather(grads, grad)
    ok = bool(grad.abs().sum() > 0) and all(torch.allclose(grads[0], g) for g in grads[1:])
    return ok, [weakref.ref(t) for t in (grad, *grads)]


def wait_until_released(refs: list, timeout_s: float = 60.0) -> None:
    """A weak reference dies when the tensor is freed, also when gloo's thread held the last reference."""
    deadline = time.monotonic() + timeout_s
    while any(r() is not None for r in refs):
        if time.monotonic() > deadline:
            raise RuntimeError(f"gloo still holds tensors of the all_gather {timeout_s:.0f} s after it finished")
        time.sleep(0.01)


dist.init_process_group("gloo")
ok, collective_tensors = gradients_agree(dist.get_rank())
# Teardown order (issue 25). A gloo worker thread drops its reference to a finished collective a moment
# after the caller's wait() returns. If that is the last reference to a tensor Python created (all_gather's
# inputs and outputs), freeing it takes the GIL; during interpreter shutdown that thread is ended by
# pthread_exit, whose unwinding through a noexcept destructor calls std::terminate ("terminate called
# without an active exception", SIGABRT) after the check passed. So: the DDP wrapper, the model and every
# tensor handed to a collective are released while the interpreter runs (they were locals of
# gradients_agree), and the script waits until gloo's thread has let go of them too; the barrier keeps a
# rank from destroying its process group while the other is still in a collective; then the process exits
# with nothing of Python left in gloo.
gc.collect()
wait_until_released(collective_tensors)
dist.barrier()
dist.destroy_process_group()
sys.exit(0 if ok else 1)
