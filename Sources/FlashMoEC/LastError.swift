#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The calling thread's message for its last failed call, as `flashmoe_last_error()` returns it.
///
/// Each thread keeps one heap copy of its message (a `pthread` key whose destructor frees it when the thread
/// exits). A new failure on the same thread frees the old copy, so a returned pointer stays valid until that
/// thread's next failed call; successful calls leave it alone.
enum LastError {
    /// nil only when the process has run out of thread-local keys (1024 per process).
    private static let key: pthread_key_t? = {
        var key = pthread_key_t()
        return pthread_key_create(&key) { free($0) } == 0 ? key : nil
    }()

    /// Replaces the calling thread's message with `message`.
    static func set(_ message: String) {
        guard let key else { return }
        let copy = strdup(message)  // nil only when out of memory: then the thread's message reads ""
        let old = pthread_getspecific(key)
        _ = pthread_setspecific(key, copy)
        free(old)
    }

    /// The calling thread's message, or "" when it has none.
    static func current() -> UnsafePointer<CChar> {
        guard let key else {
            return StaticText.pointer("flashmoe: no thread-local key was left for error messages (pthread_key_create)")
        }
        guard let message = pthread_getspecific(key) else { return StaticText.pointer("") }
        return UnsafePointer(message.assumingMemoryBound(to: CChar.self))
    }
}

/// Fixed C strings with static storage (string literals are stored NUL-terminated in the binary).
enum StaticText {
    /// A pointer to `text`'s bytes, valid for the life of the process.
    static func pointer(_ text: StaticString) -> UnsafePointer<CChar> {
        UnsafeRawPointer(text.utf8Start).assumingMemoryBound(to: CChar.self)
    }
}
