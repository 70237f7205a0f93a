"""The OpenAI Responses API, client side only (`client`)."""
