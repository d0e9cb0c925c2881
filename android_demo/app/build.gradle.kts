plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
    id("com.chaquo.python")  // after the Android plugin
}

android {
    namespace = "com.edgeshitu.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "com.edgeshitu.demo"
        minSdk = 24  // Chaquopy 17's minimum
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"

        ndk {
            // Python 3.12 under Chaquopy is 64-bit only: phones (arm64) and current emulators (x86_64).
            abiFilters += listOf("arm64-v8a", "x86_64")
        }
    }

    buildTypes {
        release {
            // Python reaches OrtBridge by name through reflection: minifying would need keep rules for it.
            isMinifyEnabled = false
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    buildFeatures {
        viewBinding = true
    }
}

// The edge-shitu wheel made by ../make-wheel. It is installed by file name: Chaquopy resolves a wheel path
// relative to this module's directory and tracks the file as a build input, so a rebuilt wheel is reinstalled.
val edgeShituWheel: String = run {
    val wheels = file("wheels").listFiles { f -> f.name.matches(Regex("edge_shitu-.+-py3-none-any\\.whl")) }
        .orEmpty().sortedBy { it.name }
    when (wheels.size) {
        1 -> "wheels/${wheels[0].name}"
        0 -> throw GradleException("No edge-shitu wheel in ${file("wheels")}: run android_demo/make-wheel first.")
        else -> throw GradleException("Several edge-shitu wheels in ${file("wheels")}: run android_demo/make-wheel again.")
    }
}

chaquopy {
    defaultConfig {
        version = "3.12"
        pip {
            // Chaquopy's own builds of numpy and Pillow (with the native libraries they need, which pip resolves).
            install("numpy==1.26.2")
            // 10.1.0: the Pillow version of Chaquopy's recipe when it built its Python 3.12 packages.
            install("pillow==10.1.0")
            // The wheel needs nothing else to run (tests/test_android.py installs it beside numpy and Pillow
            // only); its one other declared dependency, tqdm (the desktop CLI's progress bars), is small and pure
            // Python. Not --no-deps: Chaquopy applies pip options to the whole install, and that would also
            // drop the native libraries of numpy and Pillow.
            install(edgeShituWheel)
        }
    }
}

dependencies {
    implementation("androidx.core:core-ktx:1.15.0")
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("com.google.android.material:material:1.12.0")
    implementation("androidx.constraintlayout:constraintlayout:2.2.0")
    implementation("androidx.recyclerview:recyclerview:1.3.2")
    implementation("androidx.lifecycle:lifecycle-runtime-ktx:2.8.7")

    val camerax = "1.4.1"
    implementation("androidx.camera:camera-core:$camerax")
    implementation("androidx.camera:camera-camera2:$camerax")
    implementation("androidx.camera:camera-lifecycle:$camerax")
    implementation("androidx.camera:camera-view:$camerax")

    // Any 1.17+ release fits OrtBridge; 1.22.0 is reported to ship 16 KB-page-aligned native libraries.
    implementation("com.microsoft.onnxruntime:onnxruntime-android:1.22.0")
}
