"""A checkpoint as a Hugging Face–native folder that plain ``transformers`` loads without panda.

``panda export CKPT --out DIR --format hf`` writes the weights, the tokenizer, a ``config.json``
whose ``auto_map`` names the classes below, and the code itself: this package's
:mod:`~panda.hub.configuration`, :mod:`~panda.hub.modeling` and :mod:`~panda.hub.processing`, plus
every panda module they import, copied from the installed panda by :mod:`panda.hub.bundle` with
their ``panda.`` imports turned into imports of the neighbouring files. The folder therefore runs
the same STAB, projector, splice, prompt and frame code as ``panda chat``: it cannot drift from it.

    from transformers import AutoModelForCausalLM, AutoProcessor
    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    answer = model.generate(**processor(video="clip.mp4", text="What is happening?"), max_new_tokens=64)
    print(processor.batch_decode(answer, skip_special_tokens=True)[0])
"""
