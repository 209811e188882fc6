"""Contract cases of OFT and BOFT (block sizes dividing 24 and 48: valid on every shape)."""

from __future__ import annotations

from .cases import Case

NEW = {"peft_version": "0.21.2"}  # the Cayley–Neumann series is PEFT >= 0.18's

CASES = [
    Case("oft-b4-neumann", "oft", {"oft_block_size": 4, "r": 0, **NEW}),
    Case("oft-r3-cayley", "oft", {"r": 3, "oft_block_size": 0, "use_cayley_neumann": False}),
    Case("oft-r4-neumann3", "oft", {"r": 4, "oft_block_size": 0, "num_cayley_neumann_terms": 3, **NEW}),
    Case(
        "oft-b6-share-coft",
        "oft",
        {"oft_block_size": 6, "r": 0, "block_share": True, "coft": True, "eps": 0.5, **NEW},
    ),
    Case("boft-b4", "boft", {"boft_block_size": 4}),
    Case("boft-b4-f2", "boft", {"boft_block_size": 4, "boft_n_butterfly_factor": 2}),
    Case("boft-b2-f3", "boft", {"boft_block_size": 2, "boft_n_butterfly_factor": 3}),
    Case("boft-n2-f2", "boft", {"boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 2}),
]
