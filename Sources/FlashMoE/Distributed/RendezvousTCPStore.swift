import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A rendezvous store on a TCP port: rank 0 serves it (`serve`), the other ranks connect to it (`connect`). The
/// table lives in rank 0's memory; requests are framed as [op u8][key length u32][key][value length u32][value]
/// and answered [status u8][length u32][value] (little-endian). No authentication: bind it to loopback or a
/// private network only.
public final class RendezvousTCPStore: RendezvousStore, @unchecked Sendable {
    // @unchecked: immutable references; the table and the connection are behind Mutexes.

    /// The host as given.
    public let host: String
    /// The port (the one the system chose when serving on port 0).
    public let port: Int
    /// `tcp://HOST:PORT`.
    public var location: String { "tcp://\(host):\(port)" }
    private let server: Server?
    private let connection: Connection?

    /// Serves a new, empty store on `host:port` (port 0: any free port, see `port`), for rank 0.
    public static func serve(host: String, port: Int) throws(RendezvousError) -> RendezvousTCPStore {
        let server = try Server(host: host, port: port)
        return RendezvousTCPStore(host: host, port: server.port, server: server, connection: nil)
    }

    /// Connects to rank 0's store at `host:port`, retrying until `timeout` (rank 0 may start later).
    public static func connect(host: String, port: Int, timeout: Duration) throws(RendezvousError) -> RendezvousTCPStore {
        let connection = try Connection(host: host, port: port, timeout: timeout)
        return RendezvousTCPStore(host: host, port: port, server: nil, connection: connection)
    }

    private init(host: String, port: Int, server: Server?, connection: Connection?) {
        self.host = host
        self.port = port
        self.server = server
        self.connection = connection
    }

    deinit { close() }

    /// Rank 0 sets the key in its own table, the other ranks ask rank 0's server; false when `exclusive` and the key
    /// exists.
    public func set(_ key: String, _ value: [UInt8], exclusive: Bool) throws(RendezvousError) -> Bool {
        if let server { return server.table.apply(exclusive ? .setExclusive : .set, key, value).found }
        return try connection!.request(exclusive ? .setExclusive : .set, key, value, at: location).found
    }

    /// The value under `key` in rank 0's table (asked over the connection on other ranks), or nil when there is none.
    public func get(_ key: String) throws(RendezvousError) -> [UInt8]? {
        let reply: Reply
        if let server { reply = server.table.apply(.get, key, []) } else { reply = try connection!.request(.get, key, [], at: location) }
        return reply.found ? reply.value : nil
    }

    /// Removes `key` from rank 0's table (over the connection on other ranks); an absent key is fine.
    public func delete(_ key: String) throws(RendezvousError) {
        if let server { _ = server.table.apply(.delete, key, []) } else { _ = try connection!.request(.delete, key, [], at: location) }
    }

    /// Rank 0: waits (up to 5 s) for the other ranks to disconnect, then stops serving. Others: disconnects.
    public func close() {
        server?.stop(grace: .seconds(5))
        connection?.close()
    }

    // MARK: - Protocol

    enum Op: UInt8 { case set = 1, setExclusive = 2, get = 3, delete = 4 }

    struct Reply {
        /// set: stored; setExclusive: stored (false: the key existed); get: present; delete: always true.
        var found: Bool
        var value: [UInt8]
    }

    final class Table: Sendable {
        private let entries = Mutex<[String: [UInt8]]>([:])

        func apply(_ op: Op, _ key: String, _ value: [UInt8]) -> Reply {
            entries.withLock { e in
                switch op {
                case .set:
                    e[key] = value
                    return Reply(found: true, value: [])
                case .setExclusive:
                    guard e[key] == nil else { return Reply(found: false, value: []) }
                    e[key] = value
                    return Reply(found: true, value: [])
                case .get:
                    return e[key].map { Reply(found: true, value: $0) } ?? Reply(found: false, value: [])
                case .delete:
                    e[key] = nil
                    return Reply(found: true, value: [])
                }
            }
        }
    }

    /// Rank 0's listening socket, its accept thread and one thread per connected rank.
    final class Server: @unchecked Sendable {
        // @unchecked: the fd is set once; mutable state is in `clients` and `stopped`, Mutexes.
        let table = Table()
        let port: Int
        private let listener: Int32
        private let clients = Mutex<Set<Int32>>([])
        private let stopped = Mutex(false)
        private let acceptExited = Mutex(false)

        init(host: String, port: Int) throws(RendezvousError) {
            let address = try Socket.address(host: host, port: port, role: "serve")
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { throw Socket.failure("cannot create a socket", host, port) }
            var yes: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
            var bound = address
            let ok = withUnsafePointer(to: &bound) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
                }
            }
            guard ok, listen(fd, 128) == 0 else {
                let error = Socket.failure("rank 0 cannot serve the rendezvous store", host, port)
                Glibc.close(fd)
                throw error
            }
            var actual = sockaddr_in()
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &actual) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
            }
            self.port = Int(UInt16(bigEndian: actual.sin_port))
            listener = fd
            startThread { [self] in acceptLoop() }
        }

        private func acceptLoop() {
            while !stopped.withLock({ $0 }) {
                var p = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
                guard poll(&p, 1, 50) > 0 else { continue }
                let client = accept(listener, nil, nil)
                guard client >= 0 else { continue }
                var yes: Int32 = 1
                setsockopt(client, Int32(IPPROTO_TCP), TCP_NODELAY, &yes, socklen_t(MemoryLayout<Int32>.size))
                clients.withLock { _ = $0.insert(client) }
                startThread { [self] in serve(client) }
            }
            Glibc.close(listener)
            acceptExited.withLock { $0 = true }
        }

        /// Answers one connection's requests until it closes (or the server stops).
        private func serve(_ fd: Int32) {
            defer {
                clients.withLock { _ = $0.remove(fd) }
                Glibc.close(fd)
            }
            while true {
                guard let head = Socket.read(fd, 5), let op = Op(rawValue: head[0]) else { return }
                guard let key = Socket.read(fd, Int(Socket.u32(head, 1))), let lengthBytes = Socket.read(fd, 4),
                    let value = Socket.read(fd, Int(Socket.u32(lengthBytes, 0)))
                else { return }
                let reply = table.apply(op, String(decoding: key, as: UTF8.self), value)
                guard Socket.write(fd, [reply.found ? 0 : 1] + Socket.le32(reply.value.count) + reply.value) else { return }
            }
        }

        func stop(grace: Duration) {
            let clock = ContinuousClock()
            let deadline = clock.now + grace
            while clock.now < deadline && !clients.withLock({ $0.isEmpty }) { sleepFor(.milliseconds(5)) }
            stopped.withLock { $0 = true }
            clients.withLock { for fd in $0 { shutdown(fd, Int32(SHUT_RDWR)) } }
            while !acceptExited.withLock({ $0 }) { sleepFor(.milliseconds(5)) }
        }
    }

    /// A rank's connection to rank 0's store: one request at a time.
    final class Connection: @unchecked Sendable {
        // @unchecked: the fd is guarded by `lock`.
        private let lock = Mutex<Int32>(-1)

        init(host: String, port: Int, timeout: Duration) throws(RendezvousError) {
            let address = try Socket.address(host: host, port: port, role: "reach")
            let clock = ContinuousClock()
            let deadline = clock.now + timeout
            var lastError = ""
            while true {
                let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
                guard fd >= 0 else { throw Socket.failure("cannot create a socket", host, port) }
                var target = address
                let ok = withUnsafePointer(to: &target) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
                    }
                }
                if ok {
                    var yes: Int32 = 1
                    setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &yes, socklen_t(MemoryLayout<Int32>.size))
                    // A stalled server must not hang a rank: every read gives up after 30 s.
                    var limit = timeval(tv_sec: 30, tv_usec: 0)
                    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
                    lock.withLock { $0 = fd }
                    return
                }
                lastError = SystemFiles.errnoText()
                Glibc.close(fd)
                if clock.now >= deadline {
                    throw RendezvousError(
                        .timeout(missing: [0]),
                        "rendezvous at tcp://\(host):\(port) timed out after \(timeout): rank 0 never served its "
                            + "store there (\(lastError)); start rank 0 with the same --rendezvous, or check the "
                            + "host and port")
                }
                sleepFor(.milliseconds(20))
            }
        }

        func request(_ op: Op, _ key: String, _ value: [UInt8], at location: String) throws(RendezvousError) -> Reply {
            let keyBytes = Array(key.utf8)
            let message = [op.rawValue] + Socket.le32(keyBytes.count) + keyBytes + Socket.le32(value.count) + value
            let reply: Reply? = lock.withLock { fd in
                guard fd >= 0, Socket.write(fd, message), let head = Socket.read(fd, 5),
                    let body = Socket.read(fd, Int(Socket.u32(head, 1)))
                else { return nil }
                return Reply(found: head[0] == 0, value: body)
            }
            guard let reply else {
                throw RendezvousError(
                    .unreachable,
                    "lost the rendezvous store at \(location) (rank 0 serves it: it exited, or its node is unreachable)")
            }
            return reply
        }

        func close() {
            lock.withLock { fd in
                if fd >= 0 { Glibc.close(fd) }
                fd = -1
            }
        }
    }
}

/// Socket helpers for the TCP store.
enum Socket {
    /// The IPv4 address of `host` (a name or dotted quad) and `port`.
    static func address(host: String, port: Int, role: String) throws(RendezvousError) -> sockaddr_in {
        guard (0...65535).contains(port) else {
            throw RendezvousError(.badAddress, "tcp://\(host):\(port): the port must be 0...65535")
        }
        var hints = addrinfo()
        hints.ai_family = AF_INET
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, nil, &hints, &list) == 0, let first = list, let raw = first.pointee.ai_addr else {
            throw RendezvousError(.badAddress, "cannot \(role) tcp://\(host):\(port): the host name does not resolve")
        }
        defer { freeaddrinfo(list) }
        var address = raw.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee }
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        return address
    }

    static func failure(_ what: String, _ host: String, _ port: Int) -> RendezvousError {
        RendezvousError(.unreachable, "\(what) on tcp://\(host):\(port): \(SystemFiles.errnoText())")
    }

    /// Exactly `n` bytes, or nil when the peer closed, a read failed or timed out.
    static func read(_ fd: Int32, _ n: Int) -> [UInt8]? {
        guard n > 0 else { return [] }
        var buffer = [UInt8](repeating: 0, count: n)
        var got = 0
        while got < n {
            let r = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, n - got, 0) }
            if r < 0 && errno == EINTR { continue }
            guard r > 0 else { return nil }
            got += r
        }
        return buffer
    }

    /// Writes all of `bytes`; false when the peer is gone (no SIGPIPE).
    static func write(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var sent = 0
        while sent < bytes.count {
            let r = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
            if r < 0 && errno == EINTR { continue }
            guard r > 0 else { return false }
            sent += r
        }
        return true
    }

    static func le32(_ v: Int) -> [UInt8] { withUnsafeBytes(of: UInt32(v).littleEndian) { Array($0) } }
    static func u32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * $1) } }
}

/// Runs `body` on a new detached thread (the store's server blocks in poll/recv, which must not occupy the
/// cooperative thread pool).
func startThread(_ body: @escaping @Sendable () -> Void) {
    final class Box {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    var thread = pthread_t()
    let made = pthread_create(&thread, nil, { raw in
        Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().body()
        return nil
    }, box)
    if made == 0 {
        pthread_detach(thread)
    } else {
        Unmanaged<Box>.fromOpaque(box).takeRetainedValue().body()  // no thread: run inline rather than drop it
    }
}
