import Dispatch
import FlashMoE
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A swift-log handler that writes "flashmoe: message" lines to standard error, so diagnostics and progress
/// never mix with the report on standard output.
struct StandardErrorLogHandler: LogHandler {
    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    init(logLevel: Logger.Level) { self.logLevel = logLevel }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let line = "flashmoe: \(event.level <= .debug ? "[\(event.level)] " : "")\(event.message)\n"
        // One write(2) per line keeps concurrent lines whole.
        var bytes = Array(line.utf8)
        bytes.withUnsafeMutableBytes { _ = write(2, $0.baseAddress, $0.count) }
    }
}

extension Logger {
    /// The commands' logger: progress at `.notice`, details at `.debug` with `--verbose`.
    static func commandLine(verbose: Bool) -> Logger {
        Logger(label: "flashmoe") { _ in StandardErrorLogHandler(logLevel: verbose ? .debug : .notice) }
    }
}

/// Progress for steps that may take a while: a step that is still running after `quietPeriod` seconds is
/// announced on the logger with its elapsed time, again every `interval` seconds, and its end is announced too.
/// Quick steps print nothing (except at debug level).
struct Progress: Sendable {
    let logger: Logger
    var quietPeriod = 2.0
    var interval = 10.0

    /// Runs `body`, reporting "label… N s" while it runs past the quiet period.
    func step<R>(_ label: String, _ body: () throws -> R) rethrows -> R {
        logger.debug("\(label)…")
        let state = StepState()
        let clock = ContinuousClock()
        let start = clock.now
        scheduleTick(label: label, state: state, start: start, after: quietPeriod)
        defer {
            state.finished.store(true, ordering: .sequentiallyConsistent)
            if state.announced.load(ordering: .sequentiallyConsistent) {
                logger.notice("\(label): done in \(formatSeconds(clock.now - start))")
            } else {
                logger.debug("\(label): done in \(formatSeconds(clock.now - start))")
            }
        }
        return try body()
    }

    private func scheduleTick(label: String, state: StepState, start: ContinuousClock.Instant, after seconds: Double) {
        DispatchQueue.global().asyncAfter(deadline: .now() + seconds) { [self] in
            guard !state.finished.load(ordering: .sequentiallyConsistent) else { return }
            state.announced.store(true, ordering: .sequentiallyConsistent)
            logger.notice("\(label)… \(formatSeconds(ContinuousClock().now - start))")
            scheduleTick(label: label, state: state, start: start, after: interval)
        }
    }

    /// Whether a step has ended and whether it was announced, shared with its timer.
    private final class StepState: Sendable {
        let finished = Atomic<Bool>(false)
        let announced = Atomic<Bool>(false)
    }
}

/// "0.42 s", "12.3 s", "95 s".
func formatSeconds(_ d: Duration) -> String {
    let s = d.milliseconds / 1000
    return s < 10 ? "\(formatDecimal(s, 2)) s" : s < 100 ? "\(formatDecimal(s, 1)) s" : "\(formatDecimal(s, 0)) s"
}
