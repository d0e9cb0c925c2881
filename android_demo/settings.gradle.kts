pluginManagement {
    repositories {
        google {
            content {
                includeGroupByRegex("com\\.android.*")
                includeGroupByRegex("com\\.google.*")
                includeGroupByRegex("androidx.*")
            }
        }
        mavenCentral()  // Chaquopy's Gradle plugin is on Maven Central
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()  // com.microsoft.onnxruntime:onnxruntime-android, Chaquopy's runtime
    }
}

rootProject.name = "EdgeShituDemo"
include(":app")
