"""HTTP layers over shardbento.serving: error shaping, typed-API helpers, the OpenAI app."""
