// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

/// @title DGC market: the bench ledger's continuous double auction, on chain.
/// @notice Devices (DGC boards) sign EIP-712 messages; anyone (normally the service provider's
///         relay) submits them. The contract recovers the device's address from the signature,
///         so a relay can delay a message but cannot change it. See docs/ledger-evm.md.
/// @dev Rules, as in docs/ledger.md:
///  - one book per (market = slot start, side); a bitmap of price levels over the band and a
///    doubly linked FIFO per price, so price-time priority, O(1) insert at a level and O(1) cancel;
///  - an incoming order trades at the resting order's price; partial fills rest; the remainder
///    rests at its own limit; an incoming order skips the same device's resting orders;
///  - at most MAX_MATCH_STEPS resting orders (fills and self-skips) are visited per message; if
///    the cap is hit with quantity left, that remainder is cancelled (OrderClosed reason
///    CLOSE_MATCH_CAP) and a buyer's lock for it released, so the book never rests crossed
///    between two devices;
///  - a buy locks energy x limit at order time; the price improvement of each fill is released at
///    once; cancel, expiry, bulk cancel and revocation release the rest;
///  - settlement pays min(contracted, seller's report, buyer's report); the shortfall is recorded
///    against the party with the lower report (the seller on a tie), or the silent party after
///    the report deadline (the seller if both are silent).
///  Rejections by the rules (unknown market, gate closed, funds, ...) are *stored*: the nonce is
///  consumed and a Rejected event carries the code, so a resend gets the same answer. Failures
///  before the rules (bad signature, unknown or revoked device, expired, nonce used) revert and
///  change nothing.
contract DgcMarket {
    // ------------------------------------------------------------------ constants
    uint256 internal constant KIND_ORDER = 1;
    uint256 internal constant KIND_CANCEL = 2;
    uint256 internal constant KIND_BULK_CANCEL = 3;
    uint256 internal constant KIND_REPORT = 4;

    uint256 internal constant SIDE_BUY = 1;
    uint256 internal constant SIDE_SELL = 2;
    uint256 internal constant ROLE_SELLER = 1;
    uint256 internal constant ROLE_BUYER = 2;
    uint256 internal constant STATUS_DELIVERED = 1;
    uint256 internal constant STATUS_FAILED = 2;

    // rejection codes (Rejected.code); the relay maps them to the bench ledger's code strings
    uint256 internal constant R_UNKNOWN_MARKET = 1;
    uint256 internal constant R_GATE_CLOSED = 2;
    uint256 internal constant R_PRICE_OUT_OF_BAND = 3;
    uint256 internal constant R_NOT_WHOLE_LOTS = 4;
    uint256 internal constant R_ENERGY_TOO_LARGE = 5;
    uint256 internal constant R_INSUFFICIENT_FUNDS = 6;
    uint256 internal constant R_TOO_MANY_OPEN_ORDERS = 7;
    uint256 internal constant R_UNKNOWN_ORDER = 8;
    uint256 internal constant R_ORDER_CLOSED = 9;
    uint256 internal constant R_UNKNOWN_TRADE = 10;
    uint256 internal constant R_NOT_A_PARTY = 11;
    uint256 internal constant R_WRONG_ROLE = 12;
    uint256 internal constant R_TRADE_SETTLED = 13;
    uint256 internal constant R_MALFORMED = 14;

    // order states
    uint8 internal constant OPEN = 1;
    uint8 internal constant FILLED = 2;
    uint8 internal constant CLOSED = 3;

    // OrderClosed.reason
    uint256 internal constant CLOSE_CANCELLED = 1;
    uint256 internal constant CLOSE_EXPIRED = 2;
    uint256 internal constant CLOSE_MATCH_CAP = 3;
    uint256 internal constant CLOSE_BULK_CANCEL = 4;
    uint256 internal constant CLOSE_REVOKED = 5;

    uint256 public constant MAX_MATCH_STEPS = 20;
    uint256 public constant MAX_OPEN_ORDERS = 32;
    uint256 public constant MAX_ENERGY_WH = 1_000_000_000;
    uint256 public constant MAX_CLOCK_SKEW_SECONDS = 300;
    uint256 internal constant HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    bytes32 internal constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 internal constant ORDER_TYPEHASH = keccak256(
        "Order(uint256 marketId,uint256 side,uint256 energyWh,uint256 pricePerKwhMinor,uint256 nonce,uint256 issuedAt,uint256 expiresAt)"
    );
    bytes32 internal constant CANCEL_TYPEHASH =
        keccak256("Cancel(uint256 marketId,uint256 orderNonce,uint256 nonce,uint256 issuedAt,uint256 expiresAt)");
    bytes32 internal constant BULK_CANCEL_TYPEHASH =
        keccak256("BulkCancel(uint256 minNonce,uint256 nonce,uint256 issuedAt,uint256 expiresAt)");
    bytes32 internal constant REPORT_TYPEHASH = keccak256(
        "DeliveryReport(uint256 tradeId,uint256 marketId,uint256 role,uint256 energyWh,uint256 status,uint256 nonce,uint256 issuedAt,uint256 expiresAt)"
    );

    // ------------------------------------------------------------------ rules
    address public immutable operator;
    uint256 public immutable slotSeconds;
    uint256 public immutable gateClosureSeconds;
    uint256 public immutable marketsAhead;
    uint256 public immutable lotWh;
    uint256 public immutable priceMin;
    uint256 public immutable priceMax;
    uint256 public immutable reportDeadlineSeconds;
    bytes32 public immutable DOMAIN_SEPARATOR;

    // ------------------------------------------------------------------ state
    struct Device {
        uint8 status; // 0 unknown, 1 registered, 2 revoked
        uint64 minNonce; // messages with a lower nonce are refused (bulk cancel)
    }

    struct Order {
        address device;
        uint64 nonce;
        uint8 side;
        uint8 state;
        uint16 openIndex; // position in openOrders[device] while open
        uint40 marketId;
        uint32 price;
        uint64 remainingWh;
        uint56 prev;
        uint56 next;
    }

    struct Level {
        uint128 head;
        uint128 tail;
    }

    struct Trade {
        address seller;
        uint40 marketId;
        uint32 price;
        uint8 flags; // bit 0 seller reported, bit 1 buyer reported, bit 2 settled
        address buyer;
        uint64 energyWh;
        uint64 sellerWh;
        uint64 buyerWh;
    }

    mapping(address => Device) public devices;
    mapping(address => mapping(uint256 => uint256)) public nonceBitmap;
    mapping(address => uint256) public balanceOf; // milli-minor units (Wh x minor/kWh)
    mapping(address => uint256) public lockedOf;
    mapping(address => uint256) public shortfallWhOf;
    mapping(address => uint256[]) internal openOrders;
    mapping(address => mapping(uint256 => uint256)) public orderIdOf; // device => order nonce => id

    mapping(uint256 => Order) public orders;
    uint256 public orderCount;
    mapping(uint256 => Trade) public trades;
    uint256 public tradeCount;

    // book = keccak(marketId, side)
    mapping(bytes32 => mapping(uint256 => uint256)) internal bitmap; // word index => 256 levels
    mapping(bytes32 => mapping(uint256 => Level)) internal levels;
    // asks: no occupied level below hint; bids: no occupied level above hint - 1 (0 = top of band)
    mapping(bytes32 => uint256) internal hints;

    // ------------------------------------------------------------------ events
    event DeviceRegistered(address indexed device);
    event DeviceRevoked(address indexed device);
    event Credited(address indexed device, uint256 amountMilliMinor);
    event Accepted(address indexed device, uint256 indexed nonce, uint256 kind, bytes32 digest);
    event Rejected(address indexed device, uint256 indexed nonce, uint256 kind, bytes32 digest, uint256 code);
    event OrderPlaced(
        address indexed device, uint256 indexed nonce, uint256 orderId, uint256 marketId, uint256 side,
        uint256 energyWh, uint256 pricePerKwhMinor, uint256 restingWh
    );
    event OrderClosed(address indexed device, uint256 indexed nonce, uint256 orderId, uint256 closedWh, uint256 reason);
    event TradeMade(
        uint256 indexed tradeId, address indexed seller, address indexed buyer, uint256 marketId,
        uint256 sellerNonce, uint256 buyerNonce, uint256 energyWh, uint256 pricePerKwhMinor
    );
    event DeliveryReported(uint256 indexed tradeId, address indexed device, uint256 role, uint256 energyWh, uint256 status);
    event TradeSettled(
        uint256 indexed tradeId, uint256 settledWh, uint256 shortfallWh, address shortfallDevice, uint256 paidMilliMinor
    );
    event MinNonceRaised(address indexed device, uint256 minNonce);

    // ------------------------------------------------------------------ errors (revert: nothing stored)
    error NotOperator();
    error BadRules(string what);
    error BadSignature();
    error UnknownDevice(address recovered);
    error DeviceRevokedError(address device);
    error AlreadyRegistered(address device);
    error MessageExpired(uint256 expiresAt, uint256 blockTime);
    error NotYetValid(uint256 issuedAt, uint256 blockTime);
    error NonceUsed(address device, uint256 nonce);
    error NonceBelowMinimum(address device, uint256 nonce, uint256 minNonce);
    error NonceOutOfRange(uint256 nonce);
    error TooEarly(uint256 notBefore);
    error UnknownTrade(uint256 tradeId);
    error AlreadySettled(uint256 tradeId);

    modifier onlyOperator() {
        if (msg.sender != operator) revert NotOperator();
        _;
    }

    constructor(
        uint256 slotSeconds_,
        uint256 gateClosureSeconds_,
        uint256 marketsAhead_,
        uint256 lotWh_,
        uint256 priceMin_,
        uint256 priceMax_,
        uint256 reportDeadlineSeconds_
    ) {
        if (slotSeconds_ == 0 || marketsAhead_ == 0 || lotWh_ == 0) revert BadRules("slot, markets ahead and lot must be positive");
        if (priceMin_ == 0 || priceMax_ < priceMin_ || priceMax_ > type(uint32).max) revert BadRules("price band");
        if (priceMax_ - priceMin_ >= 65536) revert BadRules("price band wider than 65536 levels");
        operator = msg.sender;
        slotSeconds = slotSeconds_;
        gateClosureSeconds = gateClosureSeconds_;
        marketsAhead = marketsAhead_;
        lotWh = lotWh_;
        priceMin = priceMin_;
        priceMax = priceMax_;
        reportDeadlineSeconds = reportDeadlineSeconds_;
        DOMAIN_SEPARATOR = keccak256(
            abi.encode(DOMAIN_TYPEHASH, keccak256("DGC Market"), keccak256("1"), block.chainid, address(this))
        );
    }

    // ------------------------------------------------------------------ operator
    function registerDevice(address device) external onlyOperator {
        if (devices[device].status != 0) revert AlreadyRegistered(device);
        devices[device].status = 1;
        emit DeviceRegistered(device);
    }

    /// @notice Revoke a device (key rotated away or compromised): its open orders are cancelled
    ///         and buy locks released; its later messages revert. Its trades settle as usual.
    function revokeDevice(address device) external onlyOperator {
        if (devices[device].status != 1) revert UnknownDevice(device);
        devices[device].status = 2;
        uint256[] storage open = openOrders[device];
        while (open.length > 0) {
            _close(open[open.length - 1], CLOSE_REVOKED);
        }
        emit DeviceRevoked(device);
    }

    function credit(address device, uint256 amountMilliMinor) external onlyOperator {
        if (devices[device].status != 1) revert UnknownDevice(device);
        balanceOf[device] += amountMilliMinor;
        emit Credited(device, amountMilliMinor);
    }

    // ------------------------------------------------------------------ signed messages
    function placeOrder(
        uint256 marketId, uint256 side, uint256 energyWh, uint256 price,
        uint256 nonce, uint256 issuedAt, uint256 expiresAt, bytes32 r, bytes32 vs
    ) external {
        bytes32 structHash = keccak256(abi.encode(ORDER_TYPEHASH, marketId, side, energyWh, price, nonce, issuedAt, expiresAt));
        (address device, bytes32 digest) = _open(structHash, nonce, issuedAt, expiresAt, r, vs);
        uint256 code = _orderCode(device, marketId, side, energyWh, price);
        if (code != 0) {
            emit Rejected(device, nonce, KIND_ORDER, digest, code);
            return;
        }
        emit Accepted(device, nonce, KIND_ORDER, digest);
        _match(device, marketId, side, energyWh, price, nonce);
    }

    function cancelOrder(uint256 marketId, uint256 orderNonce, uint256 nonce, uint256 issuedAt, uint256 expiresAt, bytes32 r, bytes32 vs)
        external
    {
        bytes32 structHash = keccak256(abi.encode(CANCEL_TYPEHASH, marketId, orderNonce, nonce, issuedAt, expiresAt));
        (address device, bytes32 digest) = _open(structHash, nonce, issuedAt, expiresAt, r, vs);
        // orders are addressed by (signer, order nonce): a device can only ever name its own
        uint256 id = orderIdOf[device][orderNonce];
        uint256 code = 0;
        if (id == 0) code = R_UNKNOWN_ORDER;
        else if (orders[id].state != OPEN) code = R_ORDER_CLOSED; // closed orders keep no market id
        else if (orders[id].marketId != marketId) code = R_UNKNOWN_ORDER;
        if (code != 0) {
            emit Rejected(device, nonce, KIND_CANCEL, digest, code);
            return;
        }
        emit Accepted(device, nonce, KIND_CANCEL, digest);
        _close(id, CLOSE_CANCELLED);
    }

    /// @notice Cancel every open order of the signer with a nonce below minNonce, and refuse any
    ///         later message with such a nonce (what a board sends after losing its outbox).
    function bulkCancel(uint256 minNonce, uint256 nonce, uint256 issuedAt, uint256 expiresAt, bytes32 r, bytes32 vs) external {
        bytes32 structHash = keccak256(abi.encode(BULK_CANCEL_TYPEHASH, minNonce, nonce, issuedAt, expiresAt));
        (address device, bytes32 digest) = _open(structHash, nonce, issuedAt, expiresAt, r, vs);
        if (minNonce == 0 || minNonce > type(uint64).max) {
            emit Rejected(device, nonce, KIND_BULK_CANCEL, digest, R_MALFORMED);
            return;
        }
        emit Accepted(device, nonce, KIND_BULK_CANCEL, digest);
        if (minNonce > devices[device].minNonce) {
            devices[device].minNonce = uint64(minNonce);
            emit MinNonceRaised(device, minNonce);
        }
        uint256[] storage open = openOrders[device];
        uint256 i = open.length;
        while (i > 0) {
            i--;
            if (orders[open[i]].nonce < minNonce) _close(open[i], CLOSE_BULK_CANCEL);
        }
    }

    function reportDelivery(
        uint256 tradeId, uint256 marketId, uint256 role, uint256 energyWh, uint256 status,
        uint256 nonce, uint256 issuedAt, uint256 expiresAt, bytes32 r, bytes32 vs
    ) external {
        bytes32 structHash = keccak256(abi.encode(REPORT_TYPEHASH, tradeId, marketId, role, energyWh, status, nonce, issuedAt, expiresAt));
        (address device, bytes32 digest) = _open(structHash, nonce, issuedAt, expiresAt, r, vs);
        Trade storage t = trades[tradeId];
        uint256 code = 0;
        if (tradeId == 0 || tradeId > tradeCount || t.marketId != marketId) code = R_UNKNOWN_TRADE;
        else if (device != t.seller && device != t.buyer) code = R_NOT_A_PARTY;
        else if ((role == ROLE_SELLER ? t.seller : role == ROLE_BUYER ? t.buyer : address(0)) != device) code = R_WRONG_ROLE;
        else if (status != STATUS_DELIVERED && status != STATUS_FAILED || energyWh > type(uint64).max) code = R_MALFORMED;
        else if (t.flags & 4 != 0) code = R_TRADE_SETTLED;
        else if (block.timestamp >= _reportDeadline(t)) {
            _settle(tradeId, t);
            code = R_TRADE_SETTLED;
        }
        if (code != 0) {
            emit Rejected(device, nonce, KIND_REPORT, digest, code);
            return;
        }
        emit Accepted(device, nonce, KIND_REPORT, digest);
        uint8 bit = role == ROLE_SELLER ? 1 : 2;
        if (t.flags & bit != 0) return; // one report per (trade, role): a re-signed copy changes nothing
        t.flags |= bit;
        if (role == ROLE_SELLER) t.sellerWh = uint64(energyWh);
        else t.buyerWh = uint64(energyWh);
        emit DeliveryReported(tradeId, device, role, energyWh, status);
        if (t.flags & 3 == 3) _settle(tradeId, t);
    }

    // ------------------------------------------------------------------ anyone
    /// @notice Settle a trade whose report deadline has passed; a missing report counts as 0.
    function settleAfterDeadline(uint256 tradeId) external {
        if (tradeId == 0 || tradeId > tradeCount) revert UnknownTrade(tradeId);
        Trade storage t = trades[tradeId];
        if (t.flags & 4 != 0) revert AlreadySettled(tradeId);
        uint256 deadline = _reportDeadline(t);
        if (block.timestamp < deadline) revert TooEarly(deadline);
        _settle(tradeId, t);
    }

    /// @notice Close open orders whose market's gate has closed (they can never trade) and release
    ///         their buy locks. Ids that are not such orders are skipped. Returns how many closed.
    function expire(uint256[] calldata orderIds) external returns (uint256 closed) {
        for (uint256 i = 0; i < orderIds.length; i++) {
            uint256 id = orderIds[i];
            Order storage o = orders[id];
            if (o.state == OPEN && block.timestamp + gateClosureSeconds >= o.marketId) {
                _close(id, CLOSE_EXPIRED);
                closed++;
            }
        }
    }

    // ------------------------------------------------------------------ views
    function rules() external view returns (uint256, uint256, uint256, uint256, uint256, uint256, uint256) {
        return (slotSeconds, gateClosureSeconds, marketsAhead, lotWh, priceMin, priceMax, reportDeadlineSeconds);
    }

    function isNonceUsed(address device, uint256 nonce) public view returns (bool) {
        return nonceBitmap[device][nonce >> 8] & (1 << (nonce & 0xff)) != 0;
    }

    function openOrdersOf(address device) external view returns (uint256[] memory) {
        return openOrders[device];
    }

    /// @notice The resting orders of one book in priority order (best price first, then FIFO).
    function bookOrders(uint256 marketId, uint256 side) external view returns (uint256[] memory ids) {
        bytes32 book = _bookId(marketId, side);
        uint256 top = priceMax - priceMin;
        uint256 count = 0;
        uint256[] memory tmp = new uint256[](256);
        for (uint256 step = 0; step <= top; step++) {
            uint256 lvl = side == SIDE_SELL ? step : top - step;
            if (bitmap[book][lvl >> 8] & (1 << (lvl & 0xff)) == 0) {
                continue;
            }
            for (uint256 id = levels[book][lvl].head; id != 0; id = orders[id].next) {
                if (count == tmp.length) {
                    uint256[] memory bigger = new uint256[](tmp.length * 2);
                    for (uint256 k = 0; k < count; k++) bigger[k] = tmp[k];
                    tmp = bigger;
                }
                tmp[count++] = id;
            }
        }
        ids = new uint256[](count);
        for (uint256 k = 0; k < count; k++) ids[k] = tmp[k];
    }

    // ------------------------------------------------------------------ internals: messages
    function _open(bytes32 structHash, uint256 nonce, uint256 issuedAt, uint256 expiresAt, bytes32 r, bytes32 vs)
        internal
        returns (address device, bytes32 digest)
    {
        digest = keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR, structHash));
        uint256 s = uint256(vs) & ((1 << 255) - 1);
        if (s == 0 || s > HALF_ORDER) revert BadSignature();
        device = ecrecover(digest, uint8((uint256(vs) >> 255) + 27), r, bytes32(s));
        if (device == address(0)) revert BadSignature();
        Device storage d = devices[device];
        if (d.status == 0) revert UnknownDevice(device);
        if (d.status == 2) revert DeviceRevokedError(device);
        if (block.timestamp > expiresAt) revert MessageExpired(expiresAt, block.timestamp);
        if (issuedAt > block.timestamp + MAX_CLOCK_SKEW_SECONDS) revert NotYetValid(issuedAt, block.timestamp);
        if (nonce == 0 || nonce > type(uint64).max) revert NonceOutOfRange(nonce);
        if (nonce < d.minNonce) revert NonceBelowMinimum(device, nonce, d.minNonce);
        uint256 bit = 1 << (nonce & 0xff);
        uint256 word = nonceBitmap[device][nonce >> 8];
        if (word & bit != 0) revert NonceUsed(device, nonce);
        nonceBitmap[device][nonce >> 8] = word | bit;
    }

    function _orderCode(address device, uint256 marketId, uint256 side, uint256 energyWh, uint256 price)
        internal
        view
        returns (uint256)
    {
        if (side != SIDE_BUY && side != SIDE_SELL) return R_MALFORMED;
        uint256 nextSlot = (block.timestamp / slotSeconds + 1) * slotSeconds;
        if (marketId % slotSeconds != 0 || marketId > nextSlot + (marketsAhead - 1) * slotSeconds) return R_UNKNOWN_MARKET;
        if (marketId <= block.timestamp + gateClosureSeconds) return R_GATE_CLOSED;
        if (price < priceMin || price > priceMax) return R_PRICE_OUT_OF_BAND;
        if (energyWh == 0 || energyWh % lotWh != 0) return R_NOT_WHOLE_LOTS;
        if (energyWh > MAX_ENERGY_WH) return R_ENERGY_TOO_LARGE;
        if (openOrders[device].length >= MAX_OPEN_ORDERS) return R_TOO_MANY_OPEN_ORDERS;
        if (side == SIDE_BUY && balanceOf[device] < energyWh * price) return R_INSUFFICIENT_FUNDS;
        return 0;
    }

    // ------------------------------------------------------------------ internals: matching
    function _bookId(uint256 marketId, uint256 side) internal pure returns (bytes32) {
        return keccak256(abi.encode(marketId, side));
    }

    function _match(address device, uint256 marketId, uint256 side, uint256 energyWh, uint256 limit, uint256 nonce) internal {
        if (side == SIDE_BUY) {
            uint256 lock = energyWh * limit;
            balanceOf[device] -= lock;
            lockedOf[device] += lock;
        }
        uint256 id = ++orderCount;
        orderIdOf[device][nonce] = id;
        uint256 remaining = energyWh;
        uint256 oppositeSide = side == SIDE_BUY ? SIDE_SELL : SIDE_BUY;
        bytes32 opposite = _bookId(marketId, oppositeSide);
        uint256 limitLvl = limit - priceMin;
        uint256 steps = 0;
        bool capped = false;
        (uint256 lvl, bool found) = _firstLevel(opposite, oppositeSide, limitLvl);
        while (found && remaining > 0) {
            uint256 makerId = levels[opposite][lvl].head;
            while (makerId != 0 && remaining > 0) {
                if (steps == MAX_MATCH_STEPS) {
                    capped = true;
                    break;
                }
                steps++;
                Order storage m = orders[makerId];
                uint256 nextId = m.next;
                if (m.device != device) {
                    remaining -= _fill(makerId, m, device, side, limit, remaining, nonce);
                }
                makerId = nextId;
            }
            if (capped || remaining == 0) break;
            (lvl, found) = _nextLevel(opposite, oppositeSide, lvl, limitLvl);
        }
        Order storage o = orders[id];
        o.device = device;
        o.nonce = uint64(nonce);
        o.side = uint8(side);
        uint256 resting = 0;
        if (remaining == 0) {
            o.state = FILLED; // only the first slot: a closed order needs no market, price or links
        } else if (capped) {
            o.state = CLOSED;
            if (side == SIDE_BUY) _release(device, remaining * limit);
        } else {
            resting = remaining;
            o.state = OPEN;
            o.marketId = uint40(marketId);
            o.price = uint32(limit);
            o.remainingWh = uint64(remaining);
            _rest(id, o, marketId, side, limit - priceMin);
        }
        emit OrderPlaced(device, nonce, id, marketId, side, energyWh, limit, resting);
        if (capped) emit OrderClosed(device, nonce, id, remaining, CLOSE_MATCH_CAP);
    }

    function _fill(uint256 makerId, Order storage m, address taker, uint256 side, uint256 limit, uint256 remaining, uint256 nonce)
        internal
        returns (uint256 q)
    {
        q = remaining < m.remainingWh ? remaining : m.remainingWh;
        uint256 price = m.price;
        uint256 tradeId = ++tradeCount;
        Trade storage t = trades[tradeId];
        t.marketId = m.marketId;
        t.price = uint32(price);
        t.energyWh = uint64(q);
        if (side == SIDE_BUY) {
            t.seller = m.device;
            t.buyer = taker;
            if (limit > price) _release(taker, q * (limit - price)); // price improvement back at once
            emit TradeMade(tradeId, m.device, taker, m.marketId, m.nonce, nonce, q, price);
        } else {
            t.seller = taker;
            t.buyer = m.device;
            emit TradeMade(tradeId, taker, m.device, m.marketId, nonce, m.nonce, q, price);
        }
        if (q == m.remainingWh) {
            _unlink(makerId, m);
            m.remainingWh = 0;
            m.state = FILLED;
            _removeOpen(m.device, m.openIndex);
        } else {
            m.remainingWh = uint64(m.remainingWh - q);
        }
    }

    function _release(address device, uint256 amount) internal {
        lockedOf[device] -= amount;
        balanceOf[device] += amount;
    }

    function _close(uint256 id, uint256 reason) internal {
        Order storage o = orders[id];
        uint256 left = o.remainingWh;
        _unlink(id, o);
        if (o.side == SIDE_BUY) _release(o.device, left * o.price);
        o.remainingWh = 0;
        o.state = CLOSED;
        _removeOpen(o.device, o.openIndex);
        emit OrderClosed(o.device, o.nonce, id, left, reason);
    }

    function _rest(uint256 id, Order storage o, uint256 marketId, uint256 side, uint256 lvl) internal {
        bytes32 book = _bookId(marketId, side);
        Level storage level = levels[book][lvl];
        uint256 tail = level.tail;
        if (tail == 0) {
            level.head = uint128(id);
            bitmap[book][lvl >> 8] |= 1 << (lvl & 0xff);
        } else {
            orders[tail].next = uint56(id);
            o.prev = uint56(tail);
        }
        level.tail = uint128(id);
        if (side == SIDE_SELL) {
            if (lvl < hints[book]) hints[book] = lvl;
        } else {
            uint256 h = hints[book];
            if (h != 0 && lvl + 1 > h) hints[book] = lvl + 1;
        }
        uint256[] storage open = openOrders[o.device];
        o.openIndex = uint16(open.length);
        open.push(id);
    }

    function _unlink(uint256 id, Order storage o) internal {
        bytes32 book = _bookId(o.marketId, o.side);
        uint256 lvl = o.price - priceMin;
        Level storage level = levels[book][lvl];
        uint256 prev = o.prev;
        uint256 next = o.next;
        if (prev == 0) level.head = uint128(next);
        else orders[prev].next = uint56(next);
        if (next == 0) level.tail = uint128(prev);
        else orders[next].prev = uint56(prev);
        o.prev = 0;
        o.next = 0;
        if (level.head == 0) bitmap[book][lvl >> 8] &= ~(1 << (lvl & 0xff));
    }

    function _removeOpen(address device, uint256 index) internal {
        uint256[] storage open = openOrders[device];
        uint256 last = open[open.length - 1];
        open[index] = last;
        orders[last].openIndex = uint16(index);
        open.pop();
    }

    /// best level of a book that crosses the limit level, starting from the book's hint
    function _firstLevel(bytes32 book, uint256 side, uint256 limitLvl) internal returns (uint256 lvl, bool found) {
        uint256 top = priceMax - priceMin;
        if (side == SIDE_SELL) {
            uint256 hint = hints[book];
            if (hint > limitLvl) return (0, false);
            (lvl, found) = _scanUp(book, hint, limitLvl);
            if (found && lvl > hint) hints[book] = lvl;
        } else {
            uint256 h = hints[book];
            uint256 hint = h == 0 ? top : h - 1;
            if (hint < limitLvl) return (0, false);
            (lvl, found) = _scanDown(book, hint, limitLvl);
            if (found && lvl < hint) hints[book] = lvl + 1;
        }
    }

    function _nextLevel(bytes32 book, uint256 side, uint256 lvl, uint256 limitLvl) internal view returns (uint256, bool) {
        if (side == SIDE_SELL) {
            if (lvl >= limitLvl) return (0, false);
            return _scanUp(book, lvl + 1, limitLvl);
        }
        if (lvl <= limitLvl) return (0, false);
        return _scanDown(book, lvl - 1, limitLvl);
    }

    /// lowest occupied level in [from, to]
    function _scanUp(bytes32 book, uint256 from, uint256 to) internal view returns (uint256, bool) {
        uint256 word = from >> 8;
        uint256 bits = bitmap[book][word] & (type(uint256).max << (from & 0xff));
        while (true) {
            if (bits != 0) {
                uint256 lvl = (word << 8) | _lsb(bits);
                return lvl <= to ? (lvl, true) : (0, false);
            }
            word++;
            if (word << 8 > to) return (0, false);
            bits = bitmap[book][word];
        }
        return (0, false);
    }

    /// highest occupied level in [to, from]
    function _scanDown(bytes32 book, uint256 from, uint256 to) internal view returns (uint256, bool) {
        uint256 word = from >> 8;
        uint256 shift = 255 - (from & 0xff);
        uint256 bits = bitmap[book][word] & (type(uint256).max >> shift);
        while (true) {
            if (bits != 0) {
                uint256 lvl = (word << 8) | _msb(bits);
                return lvl >= to ? (lvl, true) : (0, false);
            }
            if (word == 0 || (word << 8) <= to) return (0, false);
            word--;
            bits = bitmap[book][word];
        }
        return (0, false);
    }

    function _lsb(uint256 x) internal pure returns (uint256 r) {
        // isolate the lowest set bit, then its index
        return _msb(x & (~x + 1));
    }

    function _msb(uint256 x) internal pure returns (uint256 r) {
        if (x >= 1 << 128) { x >>= 128; r += 128; }
        if (x >= 1 << 64) { x >>= 64; r += 64; }
        if (x >= 1 << 32) { x >>= 32; r += 32; }
        if (x >= 1 << 16) { x >>= 16; r += 16; }
        if (x >= 1 << 8) { x >>= 8; r += 8; }
        if (x >= 1 << 4) { x >>= 4; r += 4; }
        if (x >= 1 << 2) { x >>= 2; r += 2; }
        if (x >= 1 << 1) { r += 1; }
    }

    // ------------------------------------------------------------------ internals: settlement
    function _reportDeadline(Trade storage t) internal view returns (uint256) {
        return uint256(t.marketId) + slotSeconds + reportDeadlineSeconds;
    }

    function _settle(uint256 tradeId, Trade storage t) internal {
        uint256 contracted = t.energyWh;
        bool sellerIn = t.flags & 1 != 0;
        bool buyerIn = t.flags & 2 != 0;
        uint256 sellerWh = sellerIn ? t.sellerWh : 0;
        uint256 buyerWh = buyerIn ? t.buyerWh : 0;
        uint256 settled = contracted;
        if (sellerWh < settled) settled = sellerWh;
        if (buyerWh < settled) settled = buyerWh;
        uint256 shortfall = contracted - settled;
        address party = address(0);
        if (shortfall > 0) {
            if (sellerIn && !buyerIn) party = t.buyer; // exactly one silent: the silent one
            else if (buyerIn && !sellerIn) party = t.seller;
            else party = buyerWh < sellerWh ? t.buyer : t.seller; // lower report; seller on a tie or both silent
            shortfallWhOf[party] += shortfall;
        }
        uint256 price = t.price;
        uint256 pay = settled * price;
        lockedOf[t.buyer] -= contracted * price;
        balanceOf[t.buyer] += shortfall * price;
        balanceOf[t.seller] += pay;
        t.flags |= 4;
        emit TradeSettled(tradeId, settled, shortfall, party, pay);
    }
}
