"""The ``geolora`` command-line application: ``finetune`` (classification and causal-LM SFT),
``generate``, ``export`` and ``report``. Its Python entry point is
:func:`geolora.app.finetune.finetune` with :class:`geolora.app.options.FinetuneOptions`."""
