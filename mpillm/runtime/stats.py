"""What a run measured: time and bytes in collectives (CommStats, kept by the syncs), and the
report line a command prints after generating (Stats)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CommStats:
    seconds: float = 0.0       # wall time inside collectives (includes waiting for slower ranks)
    payload_bytes: int = 0     # bytes handed to Allreduce on this rank
    calls: int = 0

    def reset(self) -> None:
        self.seconds, self.payload_bytes, self.calls = 0.0, 0, 0


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0
    gen_comm_s: float = 0.0
    gen_allreduce_bytes: int = 0
    gather_bytes: int = 0
    draft_tokens: int = 0        # speculative decoding: tokens drafted, of them accepted,
    draft_accepted: int = 0
    decode_steps: int = 0        # and target steps that generated tokens (0: not speculating)

    def line(self, tp_size: int) -> str:
        pt = self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0
        gt = self.gen_tokens / self.gen_s if self.gen_s else 0.0
        n = max(self.gen_tokens, 1)
        ms = 1e3 * self.gen_s / n
        comm_ms = 1e3 * self.gen_comm_s / n
        return (f"[prompt {self.prompt_tokens} tok, {pt:.1f} tok/s | generate {self.gen_tokens} tok, {gt:.1f} tok/s | "
                f"{ms:.2f} ms/tok = {ms - comm_ms:.2f} compute + {comm_ms:.2f} comm | "
                f"sent/rank/tok: {self.gen_allreduce_bytes / n / 1024:.1f} KiB allreduce payload"
                f"{f' + {self.gather_bytes / 1024:.1f} KiB logits (each rank > 0)' if tp_size > 1 else ''} | "
                f"{self.draft_line()}ranks {tp_size}]")

    def draft_line(self) -> str:
        if not self.decode_steps:
            return ""
        rate = self.draft_accepted / self.draft_tokens if self.draft_tokens else 0.0
        return (f"draft {self.draft_accepted}/{self.draft_tokens} accepted ({100 * rate:.0f}%), "
                f"{(self.gen_tokens + 1) / self.decode_steps:.2f} tok/step | ")
