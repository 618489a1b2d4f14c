"""Speculative decoding: proposers guess a running sequence's next tokens, the target model checks them all
in one step (one query token per guess), and the rejection sampler keeps the longest prefix the target
agrees with, so output follows the target exactly while several tokens can arrive per step."""
