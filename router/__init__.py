"""An aiohttp gateway that speaks OpenAI, Anthropic and Gemini and routes to any backend."""
