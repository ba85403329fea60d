"""The HTTP intake: storefront webhooks (Shopify, WooCommerce) and generic JSON orders onto Kafka.

The mappings (``shopify``, ``woocommerce``, ``generic``) are pure functions from a parsed payload to the
event to produce; ``signatures`` checks webhook HMACs; ``service`` is the aiohttp application that ties
them to a confirmed Kafka write. Run it with ``pieceflow intake serve``.
"""
