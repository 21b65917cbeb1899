# OpenSSL libcrypto's EVP cipher interface, as the data-mode extensions use it (cext/_xts.pyx: AES-128-XTS
# of whole pages; cext/_gcm.pyx: AES-256-GCM packets). Declarations only; cimported by both
# (`from _evp cimport *`, found through setup.py's include_path).

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_CIPHER:
        pass
    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    const EVP_CIPHER *EVP_aes_128_xts()
    const EVP_CIPHER *EVP_aes_256_gcm()
    int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, void *impl,
                          const unsigned char *key, const unsigned char *iv, int enc)
    int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl, const unsigned char *inp, int inl)
    int EVP_CipherFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr)
    enum:
        EVP_CTRL_GCM_GET_TAG
        EVP_CTRL_GCM_SET_TAG
