"""Auto-interpretation of SAE latents: sample windows, explain with an LLM, score, report.

Modules, in the order the stage uses them: latents (where latents fire, via the SAE),
sampling (pure: which windows), decode (token windows to intact text), prompts, cache,
cost, backends (openai sync, openai-batch), scoring, results, report, pipeline, stage.
"""
