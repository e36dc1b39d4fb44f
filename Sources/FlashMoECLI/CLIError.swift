/// A mistake in a command's options or inputs, or a limit of this machine, found before or while running.
/// The message says what to change; the command exits non-zero with it.
struct CLIError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of problem it is, for tests that branch on it.
    enum Kind: String, Sendable, Hashable {
        /// Two options that exclude each other were both given, or one needs another.
        case conflictingOptions
        /// An option the chosen mode needs is missing.
        case missingOption
        /// An option's value is out of range.
        case invalidValue
        /// The `--input` file cannot be used as the layer's input.
        case invalidInput
        /// The layer would not fit in this machine's memory.
        case insufficientMemory
        /// The requested backend cannot run here.
        case backendUnavailable
        /// An output file could not be written.
        case cannotWrite
    }

    /// The category of the problem.
    let kind: Kind
    /// What is wrong and what to change.
    let message: String

    init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    var description: String { message }
}
