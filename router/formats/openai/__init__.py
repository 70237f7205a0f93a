"""OpenAI Chat Completions: the client side (`client`), the upstream side (`upstream`) and the
content both share (`content`)."""
