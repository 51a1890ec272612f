"""The business layer: accounts, API keys, prices, billing ledger, rate limits."""
