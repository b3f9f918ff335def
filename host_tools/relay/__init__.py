"""The service provider's relay for the EVM ledger (`dgc-host relay`).

It takes the board's signed EIP-712 messages over HTTP (the same ``POST /v1/messages`` call the
board makes to the bench ledger), pre-flights each with ``eth_call``, submits it in an EIP-1559
transaction signed with the relay's own key, waits for the receipt and answers accepted,
duplicate or rejected from the receipt's events. It cannot alter what the board signed: the
contract recovers the signer from the typed fields, so a changed byte names another (unregistered)
address and is refused.
"""
