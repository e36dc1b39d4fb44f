import Synchronization

/// The IO layer's rule for buffers whose size comes from numbers inside a file (a header's offsets and shapes,
/// config.json's layer sizes): the size is checked against what the file actually holds *before* anything is
/// allocated, so a hostile or corrupt file ends in a typed error, never in a huge allocation or a trap.
///
/// Two kinds of request go through `check`: raw reads (bytes requested at an offset, against the bytes the file
/// holds from there) and converted tensors (elements reserved, against the elements the file's validated tensors
/// hold). Tests observe every request through `recorder`, a task-local that is nil in production.
enum ReadAllocation {
    /// What a request sizes.
    enum Unit: String, Sendable {
        /// Bytes read from a file or buffer.
        case bytes
        /// Elements of a converted tensor.
        case elements
    }

    /// Every request made while it is installed (test hook): how many were allowed and refused, and the largest
    /// allowed of each unit, which a test compares with the size of the files it fed in.
    final class Recorder: Sendable {
        struct State: Sendable {
            var allowed = 0
            var refused = 0
            var largestBytes = 0
            var largestElements = 0
        }

        private let state = Mutex(State())

        init() {}

        /// A copy of what was recorded.
        var snapshot: State { state.withLock { $0 } }

        func record(_ unit: Unit, requested: Int, allowed: Bool) {
            state.withLock { s in
                guard allowed else {
                    s.refused += 1
                    return
                }
                s.allowed += 1
                switch unit {
                case .bytes: s.largestBytes = max(s.largestBytes, requested)
                case .elements: s.largestElements = max(s.largestElements, requested)
                }
            }
        }
    }

    /// Where requests are recorded (tests only).
    @TaskLocal static var recorder: Recorder?

    /// Whether `requested` units may be allocated when the file holds `available` from where they are read;
    /// records the request.
    static func allows(_ unit: Unit, requested: Int, available: Int) -> Bool {
        let ok = requested >= 0 && requested <= available
        recorder?.record(unit, requested: requested, allowed: ok)
        return ok
    }
}
